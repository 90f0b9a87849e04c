"""Fake of ``PyObjCTools.MachSignals`` (signal handlers delivered through the run loop): pystray
only installs and restores a SIGINT handler; here they are kept in a dict and never fire."""

_handlers: dict = {}


def signal(signum, handler):
    previous = _handlers.get(signum)
    _handlers[signum] = handler
    return previous


def getsignal(signum):
    return _handlers.get(signum)
