"""pystray's darwin backend, made safe for the macOS menu bar.

pystray/_darwin.py (0.19.5) leaves four things to its caller, done here:
* It draws the icon at the status bar's thickness in pixels (22 px for 22 pt: blurry on Retina)
  and never marks it as a template (invisible on a dark menu bar). ``TemplateIcon._assert_image``
  builds the NSImage from the 36 px template PNG at 18 pt with the template flag set before the
  image is installed.
* It maps a menu click to a callback by the item's position (``tag``) in the newest menu, so a
  menu replaced while it is open can run a different item. ``TemplateIcon`` sets an NSMenu
  delegate (``menuWillOpen:`` / ``menuDidClose:``) so the tray holds updates while it is open.
* It runs the setup callback on a worker thread, so ``icon.visible = True`` and ``icon.stop()``
  would touch AppKit off the main thread: ``on_main_thread`` (``AppHelper.callAfter``) is the
  one way the tray calls them.
* A framework Python runs as Python.app (a Dock icon and an app-switcher entry):
  ``use_accessory_policy`` makes it a menu-bar-only app before ``icon.run()``.
Ctrl-C makes pystray call ``NSApplication.terminate:``, which exits the process without
returning from ``run()``; ``TerminateWatch`` runs the tray's cleanup (clipboard) first.
AppKit and Foundation are imported only when these are used (pyobjc is a macOS dependency).
"""

from __future__ import annotations

import functools
import io
import logging
from typing import Any, Callable

log = logging.getLogger(__name__)

ICON_POINTS = 18             # menu bar icons are drawn at 18 pt in a 22 pt bar; the PNG is 36 px (@2x)


def on_main_thread(fn: Callable[[], Any]) -> None:
    """Run ``fn`` on the main thread's run loop (returns at once)."""
    from PyObjCTools import AppHelper  # type: ignore[import-not-found]

    AppHelper.callAfter(fn)


def use_accessory_policy() -> None:
    """No Dock icon, no app-switcher entry: a menu bar extra (call on the main thread, before run)."""
    import AppKit  # type: ignore[import-not-found]

    AppKit.NSApplication.sharedApplication().setActivationPolicy_(
        AppKit.NSApplicationActivationPolicyAccessory)


def template_nsimage(image) -> Any:
    """An NSImage from a PIL template image, at ICON_POINTS points, marked as a template."""
    import AppKit  # type: ignore[import-not-found]
    import Foundation  # type: ignore[import-not-found]

    png = io.BytesIO()
    image.save(png, "png")
    ns_image = AppKit.NSImage.alloc().initWithData_(Foundation.NSData(png.getvalue()))
    ns_image.setSize_((ICON_POINTS, ICON_POINTS))
    ns_image.setTemplate_(True)
    return ns_image


@functools.lru_cache(maxsize=None)
def _delegate_classes():
    """The NSObject subclasses (an Objective-C class may be registered only once per process)."""
    import Foundation  # type: ignore[import-not-found]

    class DbtunneldMenuWatch(Foundation.NSObject):
        def menuWillOpen_(self, menu):       # noqa: N802 - NSMenuDelegate
            self.on_open()

        def menuDidClose_(self, menu):       # noqa: N802 - NSMenuDelegate
            self.on_close()

    class DbtunneldTerminateWatch(Foundation.NSObject):
        def applicationWillTerminate_(self, notification):   # noqa: N802 - NSApplicationDelegate
            self.on_terminate()

    return DbtunneldMenuWatch, DbtunneldTerminateWatch


def menu_watch(on_open: Callable[[], None], on_close: Callable[[], None]):
    watch = _delegate_classes()[0].alloc().init()
    watch.on_open, watch.on_close = on_open, on_close
    return watch


def watch_termination(on_terminate: Callable[[], None]):
    """Make ``on_terminate`` run before NSApplication.terminate: exits; keep the result alive."""
    import AppKit  # type: ignore[import-not-found]

    watch = _delegate_classes()[1].alloc().init()
    watch.on_terminate = on_terminate
    AppKit.NSApplication.sharedApplication().setDelegate_(watch)     # a weak reference in AppKit
    return watch


def template_icon_class(base: type) -> type:
    """pystray's darwin Icon with a sharp template image and a watched menu."""

    class TemplateIcon(base):
        menu_watch = None                            # set by the tray; AppKit holds it weakly

        def _assert_image(self):
            if self._icon_image is not None:
                return
            self._icon_image = template_nsimage(self._icon)
            self._status_item.button().setImage_(self._icon_image)

        def _update_menu(self):
            super()._update_menu()
            handle = getattr(self, "_menu_handle", None)
            if handle is not None and self.menu_watch is not None:
                handle[0].setDelegate_(self.menu_watch)

    return TemplateIcon
