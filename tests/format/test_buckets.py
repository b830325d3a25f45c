"""The bucket name and the frame rule every stage shares (latentcache/buckets.py)."""

from __future__ import annotations

import pytest

from latentcache.format.buckets import Bucket, frame_rule, nearest_frame_counts


def test_a_bucket_name_round_trips_and_orders_by_size():
    b = Bucket.parse("49x480x720")
    assert (b.frames, b.height, b.width) == (49, 480, 720) and str(b) == "49x480x720"
    assert Bucket.parse(str(Bucket(1, 64, 96))) == Bucket(1, 64, 96)
    assert sorted([Bucket(17, 64, 96), Bucket(9, 96, 64)]) == [Bucket(9, 96, 64), Bucket(17, 64, 96)]


@pytest.mark.parametrize("text", ["0x64x96", "017x64x96", "17x64", "17x64x96x1", "../17x64x96", "17X64X96",
                                  "1234567x1x1", " 17x64x96", "", None, 17, ["17x64x96"]])
def test_anything_but_a_plain_bucket_name_is_refused_quoting_it(text):
    with pytest.raises(ValueError, match=r"is not FRAMESxHEIGHTxWIDTH such as 49x480x720"):
        Bucket.parse(text)
    assert Bucket.parse_or_none(text) is None


def test_a_bucket_made_from_numbers_is_checked_too():
    with pytest.raises(ValueError, match="bucket frames 0"):
        Bucket(0, 64, 96)
    with pytest.raises(ValueError, match="bucket width True"):
        Bucket(1, 64, True)


@pytest.mark.parametrize(("frames", "k", "nearest"), [(49, 4, None), (1, 4, None), (17, 8, None), (48, 4, (45, 49)),
                                                      (50, 4, (49, 53)), (0, 4, (1, 5)), (16, 8, (9, 17))])
def test_the_frame_rule_offers_the_valid_counts_around_a_bad_one(frames, k, nearest):
    assert nearest_frame_counts(frames, k) == nearest
    assert frame_rule(k) == f"{k}k+1"
