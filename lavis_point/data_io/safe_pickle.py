"""Reading pickled numpy arrays without executing anything else a pickle asks for.

A pickle is a program: each global it names is imported and called while it loads. Cap3D ships every
cloud as a pickled array, so ``load_array`` runs the pickle through an unpickler whose ``find_class``
hands out only what numpy's own array pickles use (for protocols 0-5, numpy 1 and 2 module names).
Any other global is refused before it is imported, so no code of the file's choosing runs.
"""
import codecs
import pickle

import numpy as np

_reconstruct = np.core.multiarray._reconstruct
_frombuffer = np.core.numeric._frombuffer


def _latin1_encode(text, encoding="latin1"):
    """Protocols 0-2 store an array's bytes as ``_codecs.encode(str, 'latin1')``; allow that codec only."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


# numpy 2 writes ``numpy._core``; numpy 1 writes ``numpy.core``. Both map to this process's functions.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for something other than a numpy array."""


class ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refused to load global '{module}.{name}': only numpy arrays may be "
                                    "unpickled") from None

    def persistent_load(self, pid):
        raise UnsafePickleError("refused a persistent id: only numpy arrays may be unpickled")


def load_array(file) -> np.ndarray:
    """The numpy array pickled in ``file`` (a binary file object). Raises ``UnsafePickleError`` when the
    pickle names any other global, holds anything but one numeric array, or holds an object array."""
    value = ArrayUnpickler(file).load()
    if not isinstance(value, np.ndarray):
        raise UnsafePickleError(f"the pickle holds a {type(value).__name__}, expected a numpy array")
    if value.dtype.hasobject:
        raise UnsafePickleError("the pickle holds an array of Python objects, expected numbers")
    return value
