"""Fake of PyObjC's ``objc`` module: only ``namedSelector`` (pystray/_darwin.py uses it to name the
ObjC selector of a Python method; here the method keeps its Python name and gets the selector as
an attribute) and ``error``."""


class error(Exception):  # noqa: N801 - PyObjC's name
    pass


def namedSelector(name, signature=None):  # noqa: N802 - PyObjC's name
    def decorate(fn):
        fn.selector = name if isinstance(name, bytes) else name.encode()
        return fn
    return decorate
