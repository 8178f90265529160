"""Plain readers and writers of kernel interfaces (/proc, /sys, BTF).

Nothing here holds state or policy: each function reads a file and returns a
typed record. Roots are parameters so the parsers run on fixture trees.
"""
