"""Fake of PyObjC's Foundation: NSObject (alloc/init, Python attributes on instances, as PyObjC
allows for Python subclasses), NSData (bytes), NSAttributedString and NSDictionary (inert)."""

from __future__ import annotations


class NSObject:
    @classmethod
    def alloc(cls):
        return cls.__new__(cls)

    def init(self):
        return self

    @classmethod
    def new(cls):
        return cls.alloc().init()


class NSData(bytes):
    pass


class NSAttributedString(NSObject):
    def initWithString_attributes_(self, text, attributes):
        self.text = text
        return self


class NSDictionary(NSObject):
    def initWithObjectsAndKeys_(self, *pairs):
        return self
