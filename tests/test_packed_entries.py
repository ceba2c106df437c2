"""PackedEntries: annotation entries in flat buffers, read back as the dicts they were."""
import gc

import pytest

from lavis_point.datasets.packed import PackedEntries

ENTRIES = [
    {"id": "a1", "shard": "train_points_00000.npy", "index": 0, "captions": ["a red cube", "a cube, red"]},
    {"id": "b2", "shard": "train_points_00000.npy", "index": 1, "captions": ["ein Würfel 立方体 🧊"]},
    {"id": "c3", "shard": "train_points_00001.npy", "index": 2 ** 62, "captions": []},
    {"id": "d4", "shard": "", "index": -1, "captions": ["bad \ud800 surrogate", ""], "shape": "cube"},
]


def test_every_entry_reads_back_equal():
    packed = PackedEntries(ENTRIES)
    assert len(packed) == len(ENTRIES)
    assert [packed[i] for i in range(len(ENTRIES))] == ENTRIES
    assert list(packed) == ENTRIES and packed[-1] == ENTRIES[-1] and packed[1:3] == ENTRIES[1:3]


def test_fields_of_other_kinds_or_not_in_every_entry_come_back_with_their_types():
    entries = [{"id": "x", "point": None, "flag": True, "size": 0.5, "meta": {"k": [1, 2]}, "index": 3},
               {"id": "y", "point": "clouds/y.npy", "flag": False, "size": 2, "index": 4},
               {"id": "z", "point": "clouds/z.npy", "flag": 1, "size": 1.0, "index": 2 ** 70}]
    packed = PackedEntries(entries)
    assert [packed[i] for i in range(3)] == entries
    assert type(packed[0]["flag"]) is bool and type(packed[2]["flag"]) is int and type(packed[1]["size"]) is int
    assert "meta" not in packed[1]


def test_an_entry_read_is_a_new_dict_each_time():
    packed = PackedEntries(ENTRIES)
    packed[0]["captions"].append("changed")
    assert packed[0] == ENTRIES[0]


@pytest.mark.parametrize("i", [4, -5, 100])
def test_out_of_range_is_an_index_error(i):
    with pytest.raises(IndexError):
        PackedEntries(ENTRIES)[i]


def test_no_entries():
    packed = PackedEntries([])
    assert len(packed) == 0 and list(packed) == []


def _reachable(obj):
    """Objects reachable from obj (itself included), following gc referents."""
    seen, todo = {}, [obj]
    while todo:
        o = todo.pop()
        if id(o) not in seen:
            seen[id(o)] = o
            todo.extend(r for r in gc.get_referents(o) if not isinstance(r, type))
    return len(seen)


def test_the_object_count_does_not_grow_with_the_entries():
    """What makes forked DataLoader workers share the index: reading an object writes its reference
    count, so a worker copies every page holding an object it reads. A list of dicts is ~6 objects per
    entry; packed, the entries are two buffers whatever their number."""
    def make(n):
        return [{"id": f"{i:032x}", "shard": f"s{i // 100}.npy", "index": i, "captions": [f"thing {i}", "x"],
                 "extra": [i]} for i in range(n)]
    small, large = _reachable(PackedEntries(make(10))), _reachable(PackedEntries(make(20000)))
    assert _reachable(make(10)) > 50 and small < 10 and large == small


def test_a_value_of_another_type_is_refused_naming_the_entry():
    with pytest.raises(ValueError, match="annotation entry 1: .*str, int, float"):
        PackedEntries([{"id": "a"}, {"id": object()}])
