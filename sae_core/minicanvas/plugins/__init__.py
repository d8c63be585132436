"""MiniCanvas plug-ins: one module per erasure method, listed in :data:`sae_core.minicanvas.methods.PLUGINS`.

A plug-in adapts the canvas (its text encoder, UNet and sampler) to its method's pipeline and returns the
edited canvas. Modules are imported on demand, so this package file imports none of them.
"""
