"""Process-level workarounds for known XLA bugs, applied when prs_jax is imported.

jax/jaxlib 0.10.2 miscompile a jitted, vmapped matrix-vector product followed by a reduction on CPU
(jax-ml/jax#39103: wrong float32 values once the batch passes 2^15 rows). The fault is in 0.10.2's new YNNPACK
reduce fusion: with that one fusion type disabled (`--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_REDUCE`)
the reproduction is exact, while 0.10.2 keeps its YNNPACK matmuls, which decode a real checkpoint ~1.4x faster
than 0.10.1 on CPU (measured on SmolLM2-135M, see the README's benchmark table). XLA reads XLA_FLAGS when it
compiles its first program, so the flag is added to the environment at import, before any prs_jax program
compiles. A caller who already initialised JAX before importing prs_jax gets a warning instead and XLA_FLAGS is
left as it is: the flag could no longer take effect in that process, and JAX's persistent compilation cache keys
programs by XLA_FLAGS, so setting it anyway would file miscompiled programs under the fixed flags' key.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import warnings

YNN_REDUCE_OFF = "--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_REDUCE"
AFFECTED_RELEASES = ((0, 10, 2),)  # release numbers: 0.10.2, 0.10.2.post1 and dev builds of it alike


def jaxlib_version() -> str | None:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def needs_ynn_reduce_off(version: str | None) -> bool:
    """Whether this jaxlib version carries jax-ml/jax#39103."""
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", version or "")
    return m is not None and tuple(map(int, m.groups())) in AFFECTED_RELEASES


def flags_with_workaround(flags: str) -> str:
    """XLA_FLAGS with the YNN reduce fusion disabled, unless the caller already chose YNN fusion types."""
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return flags
    return (flags + " " + YNN_REDUCE_OFF).strip()


def _compiled_already() -> bool:
    # conservative: XLA parses XLA_FLAGS at its first compilation, which needs an initialised backend
    mod = sys.modules.get("jax._src.xla_bridge")
    check = getattr(mod, "backends_are_initialized", None)
    return bool(check()) if check is not None else False


def apply(environ: dict | None = None) -> bool:
    """Add the workaround's flag to XLA_FLAGS where the installed jaxlib needs it; True if it was added."""
    env = os.environ if environ is None else environ
    if not needs_ynn_reduce_off(jaxlib_version()):
        return False
    flags = env.get("XLA_FLAGS", "")
    new = flags_with_workaround(flags)
    if new == flags:
        return False
    if environ is None and _compiled_already():
        warnings.warn(
            f"jaxlib {jaxlib_version()} miscompiles vmapped matmul + reduction on CPU (jax-ml/jax#39103), and JAX "
            f"was initialised before prs_jax was imported, so prs_jax cannot add {YNN_REDUCE_OFF} to XLA_FLAGS any "
            "more. Import prs_jax before running any JAX computation, or set that flag in XLA_FLAGS yourself.",
            RuntimeWarning, stacklevel=3)
        return False
    env["XLA_FLAGS"] = new
    return True
