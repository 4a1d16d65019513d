"""The extent map against a plain dict model, driven by hypothesis."""

from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.volume.extents import ExtentMap

ops = st.lists(
    st.tuples(st.sampled_from(["map", "unmap"]), st.integers(0, 60), st.integers(1, 8), st.integers(0, 1000)),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_extent_map_matches_model(script: list[tuple[str, int, int, int]]) -> None:
    em = ExtentMap()
    model: dict[int, int] = {}
    for kind, start, count, unit in script:
        if kind == "map":
            if any(fu in model for fu in range(start, start + count)):
                continue
            em.map(start, unit, count)
            for k in range(count):
                model[start + k] = unit + k
        else:
            freed = em.unmap(start, count)
            expect = sorted(model.pop(fu) for fu in range(start, start + count) if fu in model)
            got = sorted(u + k for u, n in freed for k in range(n))
            assert got == expect
        for fu, u, n in em.segments(0, 80):
            for k in range(n):
                assert model.get(fu + k) == (None if u is None else u + k)
        runs = list(em.runs())
        for (l1, p1, n1), (l2, p2, _) in zip(runs, runs[1:], strict=False):
            assert l1 + n1 <= l2, "runs overlap or are out of order"
            assert not (l1 + n1 == l2 and p1 + n1 == p2), "adjacent contiguous runs were not merged"
    assert em.mapped_units() == len(model)


def test_contiguous_maps_merge_into_one_run() -> None:
    em = ExtentMap()
    em.map(0, 10, 2)
    em.map(4, 14, 2)
    em.map(2, 12, 2)
    assert list(em.runs()) == [(0, 10, 6)]
