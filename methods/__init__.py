"""Methods: one small file per method, registered by name (see ``methods.registry``)."""

from methods.registry import (Method, MethodError, build_method, get_method, list_methods,
                              load_plugins, register_method)

__all__ = ["Method", "MethodError", "build_method", "get_method", "list_methods",
           "load_plugins", "register_method"]
