"""An app whose import fails: start must report this error and exit non-zero."""
raise ImportError("this test app cannot be imported (on purpose)")
