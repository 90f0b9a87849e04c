"""Fake of PyObjC's AppKit, as much as pystray/_darwin.py and dbtunneld use, with AppKit's rules.

Real behaviour followed (Apple's AppKit documentation unless noted):
* Main thread: NSApplication, NSStatusBar, NSStatusItem, its button and NSMenu are main-thread
  only; every such call goes through ``_cocoa_state.record`` (violation -> exception).
* ``NSApplication.run()`` runs the main run loop on the thread that calls it. ``stop:`` "sets a
  flag that the app checks only after it finishes dispatching an actual event object", hence
  pystray's ``_stop`` posting a dummy NSApplicationDefined event; ``postEvent:atStart:`` "can also
  be called in subthreads". Functions queued with ``AppHelper.callAfter`` run on the run loop in
  the common modes, which include the event-tracking mode of an open menu: they run while a menu
  is open, too.
* Activation policy: a framework Python (python.org, Homebrew) runs inside Python.app, a regular
  app, so the policy starts as NSApplicationActivationPolicyRegular (Dock icon, app switcher);
  NSApplicationActivationPolicyAccessory (1) is "doesn't appear in the Dock".
* ``NSStatusBar.thickness`` is 22 points. NSImage ``initWithData:`` from a PNG without DPI
  metadata has size = pixels (72 dpi); ``setSize:`` changes the point size only; ``template``
  makes the menu bar tint it (dark and light menu bars).
* NSMenu: the delegate is a weak reference (``@property(weak) id<NSMenuDelegate> delegate``);
  ``menuWillOpen:`` before tracking starts, ``menuDidClose:`` when tracking ends, and only after
  that the chosen item's action is sent to its target (the click below does it in that order).
* NSPasteboard: ``changeCount`` "increments each time the pasteboard ownership changes";
  ``clearContents`` and ``declareTypes:owner:`` take ownership and return the new change count;
  ``setString:forType:`` writes data without changing the owner (the count stays).
"""

from __future__ import annotations

import io
import queue
import threading
import traceback
import weakref

import _cocoa_state
from _cocoa_state import NSInternalInconsistencyException  # noqa: F401 - re-exported

NSVariableStatusItemLength = -1.0
NSApplicationDefined = 15
NSOnState, NSOffState = 1, 0
NSFontAttributeName = "NSFont"
NSApplicationActivationPolicyRegular = 0
NSApplicationActivationPolicyAccessory = 1
NSApplicationActivationPolicyProhibited = 2
NSPasteboardTypeString = "public.utf8-plain-text"


def _rec(name: str, *args, main_only: bool = True):
    return _cocoa_state.state().record(name, *args, main_only=main_only)


def NSPoint(x, y):  # noqa: N802
    return (x, y)


# ----------------------------------------------------------------------------- application

class NSEvent:
    @classmethod
    def otherEventWithType_location_modifierFlags_timestamp_windowNumber_context_subtype_data1_data2_(
            cls, kind, *rest):
        event = cls()
        event.kind = kind
        return event


class NSApplication:
    _shared: "NSApplication | None" = None

    @classmethod
    def sharedApplication(cls):
        _rec("NSApplication.sharedApplication")
        state = _cocoa_state.state()
        if cls._shared is None or cls._shared._state is not state:
            cls._shared = cls(state)
        return cls._shared

    def __init__(self, state) -> None:
        self._state = state
        self._policy = NSApplicationActivationPolicyRegular
        self._stop_flag = False
        self._terminated = False
        self._delegate = None
        self.running = False

    def activationPolicy(self):
        return self._policy

    def setActivationPolicy_(self, policy):
        _rec("NSApplication.setActivationPolicy", policy)
        self._policy = policy
        return True

    def run(self):
        _rec("NSApplication.run", self._policy)
        self.running = True
        try:
            while not self._terminated:
                kind, payload = self._state.main_queue.get()
                self._dispatch(kind, payload)
                if kind == "event" and self._stop_flag:
                    self._stop_flag = False
                    return
        finally:
            self.running = False

    def _dispatch(self, kind, payload):
        try:
            if kind == "call":
                payload()
            elif kind == "event" and callable(getattr(payload, "perform", None)):
                payload.perform()
        except Exception:          # NSApplication reports exceptions raised in handlers and goes on
            self._state.errors = getattr(self._state, "errors", []) + [traceback.format_exc()]
            traceback.print_exc()

    def run_nested_until(self, done: threading.Event):
        """The event-tracking loop of an open menu: queued calls still run until ``done``."""
        while not done.is_set():
            try:
                kind, payload = self._state.main_queue.get(timeout=0.05)
            except queue.Empty:
                continue
            self._dispatch(kind, payload)

    def stop_(self, sender):
        _rec("NSApplication.stop")
        self._stop_flag = True

    def setDelegate_(self, delegate):
        _rec("NSApplication.setDelegate")
        self._delegate = weakref.ref(delegate) if delegate is not None else None

    def terminate_(self, sender):
        """terminate: tells the delegate (applicationWillTerminate:) and then calls exit(): run()
        never returns and no Python `finally` runs. The fake records the exit and ends the loop."""
        _rec("NSApplication.terminate")
        delegate = self._delegate() if self._delegate is not None else None
        if delegate is not None and hasattr(delegate, "applicationWillTerminate_"):
            delegate.applicationWillTerminate_(None)
        _rec("process.exit", main_only=False)
        self._terminated = True

    def postEvent_atStart_(self, event, at_start):
        _rec("NSApplication.postEvent", main_only=False)
        self._state.main_queue.put(("event", event))


# ----------------------------------------------------------------------------- status bar

class NSImage:
    @classmethod
    def alloc(cls):
        return cls()

    def initWithData_(self, data):
        from PIL import Image

        with Image.open(io.BytesIO(bytes(data))) as img:
            self.pixels = img.size
            self.mode = img.mode
        self._size = (float(self.pixels[0]), float(self.pixels[1]))
        self._template = False
        return self

    def size(self):
        return self._size

    def setSize_(self, size):
        self._size = (float(size[0]), float(size[1]))

    def setTemplate_(self, flag):
        self._template = bool(flag)

    def isTemplate(self):
        return self._template


class NSStatusBarButton:
    def __init__(self) -> None:
        self._image = None
        self.hidden = True
        self.tooltip = None
        self.target = self.action = None
        self.installed: list[dict] = []            # the image's state each time one is set

    def setTarget_(self, target):
        _rec("NSStatusBarButton.setTarget")
        self.target = target

    def setAction_(self, action):
        _rec("NSStatusBarButton.setAction")
        self.action = action

    def setHidden_(self, hidden):
        _rec("NSStatusBarButton.setHidden", hidden)
        self.hidden = bool(hidden)

    def setToolTip_(self, text):
        _rec("NSStatusBarButton.setToolTip", text)
        self.tooltip = text

    def setImage_(self, image):
        _rec("NSStatusBarButton.setImage")
        self._image = image
        self.installed.append({"points": image.size(), "pixels": image.pixels, "template": image.isTemplate()})

    def image(self):
        _rec("NSStatusBarButton.image")
        return self._image


class NSStatusItem:
    def __init__(self) -> None:
        self._button = NSStatusBarButton()
        self._menu = None

    def button(self):
        _rec("NSStatusItem.button")
        return self._button

    def setMenu_(self, menu):
        _rec("NSStatusItem.setMenu")
        self._menu = menu

    def menu(self):
        return self._menu


class NSStatusBar:
    _system: "NSStatusBar | None" = None

    @classmethod
    def systemStatusBar(cls):
        _rec("NSStatusBar.systemStatusBar")
        if cls._system is None or cls._system._state is not _cocoa_state.state():
            cls._system = cls()
        return cls._system

    def __init__(self) -> None:
        self._state = _cocoa_state.state()
        self.items: list[NSStatusItem] = []

    def thickness(self):
        _rec("NSStatusBar.thickness")
        return 22.0

    def statusItemWithLength_(self, length):
        _rec("NSStatusBar.statusItemWithLength")
        item = NSStatusItem()
        self.items.append(item)
        return item

    def removeStatusItem_(self, item):
        _rec("NSStatusBar.removeStatusItem")
        self.items.remove(item)


# ----------------------------------------------------------------------------- menus

class NSFont:
    @classmethod
    def boldSystemFontOfSize_(cls, size):
        return cls()

    @classmethod
    def menuFontOfSize_(cls, size):
        return cls()

    def pointSize(self):
        return 14.0


class NSMenuItem:
    @classmethod
    def alloc(cls):
        return cls()

    @classmethod
    def separatorItem(cls):
        item = cls()
        item._title, item._separator = "", True
        return item

    def __init__(self) -> None:
        self._title, self._separator = "", False
        self._action = self._target = self._submenu = None
        self._tag, self._state, self._enabled = 0, NSOffState, True

    def initWithTitle_action_keyEquivalent_(self, title, action, key):
        _rec("NSMenuItem.init", title)
        self._title, self._action = title, action
        return self

    def title(self):
        return self._title

    def isSeparatorItem(self):
        return self._separator

    def setSubmenu_(self, menu):
        self._submenu = menu

    def submenu(self):
        return self._submenu

    def setAction_(self, action):
        self._action = action

    def setTarget_(self, target):
        self._target = target

    def target(self):
        return self._target

    def setTag_(self, tag):
        self._tag = tag

    def tag(self):
        return self._tag

    def setAttributedTitle_(self, text):
        pass

    def setState_(self, state):
        self._state = state

    def setEnabled_(self, enabled):
        self._enabled = bool(enabled)

    def isEnabled(self):
        return self._enabled

    def send_action(self):
        """What AppKit does after tracking ends: send the action to the target with the item as sender."""
        for name in dir(type(self._target)):
            method = getattr(type(self._target), name)
            if getattr(method, "selector", None) == self._action:
                return method(self._target, self)
        raise AttributeError(f"{self._target!r} does not respond to {self._action!r}")


class NSMenu:
    @classmethod
    def alloc(cls):
        return cls()

    def initWithTitle_(self, title):
        _rec("NSMenu.init", title)
        self._title, self._items, self._delegate = title, [], None
        return self

    def setAutoenablesItems_(self, flag):
        pass

    def addItem_(self, item):
        _rec("NSMenu.addItem")
        self._items.append(item)

    def itemArray(self):
        return list(self._items)

    def setDelegate_(self, delegate):
        _rec("NSMenu.setDelegate")
        self._delegate = weakref.ref(delegate) if delegate is not None else None

    def delegate(self):
        return self._delegate() if self._delegate is not None else None

    def item_titled(self, *path):
        menu, item = self, None
        for title in path:
            item = next(i for i in menu._items if i.title() == title)
            menu = item.submenu()
        return item


# ----------------------------------------------------------------------------- the user (test hooks)

class _OpenMenu:
    """One menu-tracking session: open the status item's menu, run queued calls, click, close."""

    def __init__(self, status_item: NSStatusItem) -> None:
        self.status_item = status_item
        self.clicked: tuple | None = None
        self.opened = threading.Event()
        self.choice = threading.Event()
        self.finished = threading.Event()

    def perform(self):
        menu = self.status_item.menu()
        delegate = menu.delegate() if menu is not None else None
        if delegate is not None:
            delegate.menuWillOpen_(menu)
        self.opened.set()
        NSApplication.sharedApplication().run_nested_until(self.choice)
        item = menu.item_titled(*self.clicked) if self.clicked and menu is not None else None
        if delegate is not None:
            delegate.menuDidClose_(menu)
        try:
            if item is not None:
                item.send_action()
        finally:
            self.finished.set()

    def click(self, *titles: str) -> None:
        """Choose the item with these titles (a path into submenus) in the menu that is open."""
        self.clicked = titles
        self.choice.set()

    def dismiss(self) -> None:
        self.choice.set()


def simulate_open_menu(status_item: NSStatusItem) -> _OpenMenu:
    """The user clicks the status item: its menu opens on the main thread (call from any thread)."""
    session = _OpenMenu(status_item)
    _cocoa_state.state().main_queue.put(("event", session))
    return session


# ----------------------------------------------------------------------------- pasteboard

class NSPasteboard:
    _general: "NSPasteboard | None" = None

    @classmethod
    def generalPasteboard(cls):
        if cls._general is None or cls._general._state is not _cocoa_state.state():
            cls._general = cls()
        return cls._general

    def __init__(self) -> None:
        self._state = _cocoa_state.state()
        self._count = 0
        self._types: list[str] = []
        self._data: dict[str, str] = {}
        self._lock = threading.Lock()

    def changeCount(self):
        return self._count

    def clearContents(self):
        _rec("NSPasteboard.clearContents", main_only=False)
        with self._lock:
            self._count += 1
            self._types, self._data = [], {}
            return self._count

    def declareTypes_owner_(self, types, owner):
        with self._lock:
            self._count += 1
            self._types, self._data = list(types), {}
            return self._count

    def setString_forType_(self, text, kind):
        with self._lock:
            if kind not in self._types:
                self._types.append(kind)       # clearContents-then-write is also allowed (10.6+)
            self._data[kind] = text
            return True

    def stringForType_(self, kind):
        return self._data.get(kind)

    def types(self):
        return list(self._types)

    def simulate_other_app_copies(self, text: str) -> None:
        """Another application writes the pasteboard (it becomes the owner: the count moves)."""
        self.clearContents()
        self.setString_forType_(text, NSPasteboardTypeString)
