"""Annotation entries held in one flat buffer instead of one Python dict per entry.

A DataLoader worker forked from the main process shares its memory until it writes to it, and reading
a Python object writes to it: its reference count changes, and a garbage collection marks every
container. A list of dicts is therefore copied, page by page, into every worker that reads it: about
0.5 GB per worker for Cap3D's 660k entries (``scripts/bench_index.py``), on every rank. ``PackedEntries``
holds the entries as one ``bytes`` object and an array of where each ends, so a worker reading them
writes to two objects, and rebuilds an entry's dict when asked for it (a few microseconds, once per
item).

Each entry is stored in ``marshal`` form: it round-trips exactly the types annotations hold (str, int,
float, bool, None, lists and dicts), lone surrogates included, and is several times faster to read back
than JSON. The bytes are made here, in this process, from the entries given: they are never read from
or written to a file, and unmarshalling builds plain values, it runs nothing.
"""
import marshal
from array import array
from collections.abc import Sequence


class PackedEntries(Sequence):
    """A read-only sequence of dicts (``entries[i]`` is a new dict equal to the i-th given one)."""

    def __init__(self, entries):
        blobs = []
        for k, entry in enumerate(entries):
            try:
                blobs.append(marshal.dumps(entry))
            except ValueError as e:
                raise ValueError(f"annotation entry {k}: {e}: its values must be str, int, float, bool, None, "
                                 f"lists or dicts (as JSON gives them)") from None
        self._data = b"".join(blobs)
        self._ends = array("q")
        end = 0
        for blob in blobs:
            end += len(blob)
            self._ends.append(end)

    def __len__(self):
        return len(self._ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self._ends)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"entry {i} of {n}")
        return marshal.loads(self._data[self._ends[i - 1] if i else 0:self._ends[i]])
