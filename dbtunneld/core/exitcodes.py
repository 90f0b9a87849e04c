"""The process exit codes of every dbtunneld command, defined once.

0 ok; 1 failure at run time; 2 usage or config error; 3 daemon not running; 4 sign-in needed;
5 a tunnel or credential is not healthy; 6 (`dbtunneld daemon`) another daemon of this user is
already running (login managers must not restart on it: that would be a restart loop).
"""

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_CONFIG = EXIT_USAGE          # a bad config is a usage error: the same code everywhere
EXIT_NO_DAEMON = 3
EXIT_SIGN_IN = 4
EXIT_UNHEALTHY = 5
EXIT_ALREADY_RUNNING = 6
