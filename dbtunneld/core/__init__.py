"""Layer 0, vocabulary: errors, the data model, timing maths, config parsing, paths, exit codes.

Pure definitions every other layer shares. May import only the standard library and each other.
"""
