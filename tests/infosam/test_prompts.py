import torch

from infosam.prompts import boxes_from_masks, points_from_masks, sample_prompts


def _mask(boxes, size=64):
    m = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
    for i, b in enumerate(boxes):
        if b is not None:
            x0, y0, x1, y1 = b
            m[i, y0 : y1 + 1, x0 : x1 + 1] = 1
    return m


def test_tight_boxes_without_jitter():
    boxes, empty = boxes_from_masks(_mask([(3, 5, 20, 30), (10, 10, 10, 10)]))
    assert boxes.tolist() == [[3, 5, 20, 30], [10, 10, 10, 10]]
    assert not empty.any()


def test_jitter_is_bounded_by_max_shift_and_half_the_shorter_side():
    masks = _mask([(10, 10, 50, 50)] * 200 + [(30, 30, 31, 32)] * 50)
    boxes, _ = boxes_from_masks(masks, max_shift=5, generator=torch.Generator().manual_seed(0))
    big, small = boxes[:200], boxes[200:]
    tight = torch.tensor([10.0, 10, 50, 50])
    shift = big - tight
    assert shift.min() >= -5 and shift.max() <= 4  # offsets in [-m, m)
    assert shift.abs().sum() > 0
    # A 2x3 px object: m = min(5, 1) = 1, so offsets in [-1, 1) and the box never inverts.
    assert ((small - torch.tensor([30.0, 30, 31, 32])).abs() <= 1).all()
    assert (small[:, 2] >= small[:, 0]).all() and (small[:, 3] >= small[:, 1]).all()


def test_empty_and_one_pixel_masks_never_crash_and_are_reported():
    masks = _mask([None, (7, 9, 7, 9), (0, 0, 63, 63)])
    boxes, empty = boxes_from_masks(masks, max_shift=5, generator=torch.Generator().manual_seed(1))
    assert empty.tolist() == [True, False, False]
    assert boxes[0].tolist() == [0, 0, 63, 63]
    assert boxes[1].tolist() == [7, 9, 7, 9]
    coords, labels, empty = points_from_masks(
        masks, 2, 3, generator=torch.Generator().manual_seed(0)
    )
    assert coords.shape == (3, 5, 2)
    assert labels[0].tolist() == [-1, -1, 0, 0, 0]  # no foreground: positives are "not a point"
    assert coords[1, :2].tolist() == [[7, 9], [7, 9]]
    assert labels[2].tolist() == [1, 1, -1, -1, -1]  # no background


def test_points_land_on_foreground_and_background():
    masks = _mask([(5, 5, 20, 40)] * 16)
    coords, labels, _ = points_from_masks(masks, 1, 2, generator=torch.Generator().manual_seed(0))
    for i in range(16):
        for (x, y), lab in zip(coords[i].long().tolist(), labels[i].tolist()):
            assert masks[i, y, x] == (1 if lab == 1 else 0)


def test_mixed_mode_is_per_batch_and_deterministic():
    masks = _mask([(5, 5, 20, 40)] * 4)
    kinds = [
        sample_prompts(masks, "mixed", generator=torch.Generator().manual_seed(s)).kind
        for s in range(20)
    ]
    assert set(kinds) == {"box", "point"}
    again = [
        sample_prompts(masks, "mixed", generator=torch.Generator().manual_seed(s)).kind
        for s in range(20)
    ]
    assert kinds == again
