"""onnxruntime sessions on the CPU provider, without onnxruntime's provider fallback.

On a load failure, onnxruntime's Python wrapper prints four "EP Error ... Falling back ... retrying" lines to
*stdout* and loads the same model again on the same CPU provider. For a crafted bundle that is junk in the
generated-text stream and a second wasted load before our one-line error. The fallback flag is cleared before
the session is created (onnxruntime's own attribute; should a later version rename it, the override is simply
never called and the old behaviour returns). Device side: onnxruntime only."""

from __future__ import annotations

_SESSION = None


def cpu_session(model, options):
    """`onnxruntime.InferenceSession(model, options)` on the CPU provider; load errors raise once, print nothing."""
    global _SESSION
    if _SESSION is None:
        import onnxruntime as ort

        class NoFallbackSession(ort.InferenceSession):
            def _create_inference_session(self, *args, **kwargs):
                self._enable_fallback = False
                return super()._create_inference_session(*args, **kwargs)

        _SESSION = NoFallbackSession
    return _SESSION(model, options, providers=["CPUExecutionProvider"])
