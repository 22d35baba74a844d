"""Example daemons on the SDK (:mod:`pager.sdk`) and the raw attach (:mod:`pager.attach`).

``minimal_pager.py`` (a custom pager in forty lines), ``access_listener.py`` (a
``xen-access``-like listener) and ``c_pager.c`` (a pager in C on the raw attach).
Each is run by ``tests/integration/test_sdk_examples.py``.
"""
