"""Runtime patches of upstream libraries (installed as the ``nbzoo_patches`` package).

One module per patch, each defining ``PATCH = nbzoo.patching.Patch(...)``; see nbzoo/patching.py.
"""
