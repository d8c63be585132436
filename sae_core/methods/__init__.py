"""MiniCanvas plug-ins: one module per erasure method, each registering itself with
:func:`sae_core.minicanvas.methods.register_method` when imported.

Modules are imported on demand (the command line imports the ones it knows), so this package
file imports none of them: one method's dependencies never load with another's.
"""
