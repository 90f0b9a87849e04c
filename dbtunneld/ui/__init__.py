"""Layer 4, front-ends: the command line, the tray and its menu model, the setup window
(``onboarding/``), clipboard, notifications and start-at-login.

May import every layer below; the only layer that imports UI toolkits (pystray, Pillow, Xlib, GTK,
tkinter, AppKit) and the only one allowed to start the sandbox (``cli``).
"""
