"""frames.py: latest-frame-wins slots, batched encoding, the embedding cache and frame selection."""
import io
import threading
import types

import numpy as np
import pytest

from mobilevlm_ros.core.errors import EncodeAborted, ImageError
from mobilevlm_ros.engine.frames import (NS, CachedFrame, Frame, FrameStore, FrameUnavailable,
                                      check_requested_stamp, select_frame)

S = NS  # one second in ns
NOW = 1_000 * S


class FakeModel:
    """model.encode stand-in: records the batches, returns one embedding object per frame."""

    def __init__(self, fail=False):
        self.batches = []
        self.fail = fail

    def encode(self, frames, channel_order="rgb", abort=None):
        if self.fail:
            raise RuntimeError("encoder exploded")
        self.batches.append([np.array(f) for f in frames])
        assert channel_order == "rgb"
        return [types.SimpleNamespace(embeds=f.mean(), vision_ms=5.0) for f in frames]


def frame(camera="front", t=NOW, pixels=None, **kw):
    if pixels is None and "compressed" not in kw:
        pixels = np.zeros((4, 6, 3), np.uint8)
    return Frame(camera, header=f"hdr@{t}", stamp_ns=t, received_ns=t, pixels=pixels, **kw)


def test_latest_frame_wins_and_counts_drops():
    store = FrameStore(["front"], 4)
    assert not store.offer(frame(t=NOW - 3 * S))
    assert store.offer(frame(t=NOW - 2 * S))
    assert store.offer(frame(t=NOW - S))
    st = store.stats()["front"]
    assert (st.received, st.dropped, st.encoded) == (3, 2, 0)
    assert store.cameras["front"].pending.stamp_ns == NOW - S


def test_encode_pending_batches_cameras_in_one_call_and_caches():
    store = FrameStore(["front", "rear"], 2)
    model = FakeModel()
    store.offer(frame("front", NOW - S))
    store.offer(frame("rear", NOW - S))
    cached = store.encode_pending(model)
    assert len(model.batches) == 1 and len(model.batches[0]) == 2
    assert {c.camera for c in cached} == {"front", "rear"}
    assert store.cameras["front"].pending is None
    assert store.encode_pending(model) == []          # nothing pending: no call
    assert len(model.batches) == 1
    st = store.stats()["front"]
    assert st.encoded == 1 and st.vision_ms == 5.0


def test_cache_keeps_last_k_frames():
    store = FrameStore(["front"], 2)
    model = FakeModel()
    for i in range(5):
        store.offer(frame(t=NOW - (5 - i) * S // 10))
        store.encode_pending(model)
    cache = store.cameras["front"].cache
    assert len(cache) == 2
    assert [c.stamp_ns for c in cache] == [NOW - 2 * S // 10, NOW - S // 10]


def test_bgr_and_alpha_become_rgb_before_encoding():
    store = FrameStore(["a", "b", "c"], 1)
    model = FakeModel()
    bgr = np.zeros((2, 2, 3), np.uint8)
    bgr[..., 0] = 200                                   # blue in BGR order
    bgra = np.zeros((2, 2, 4), np.uint8)
    bgra[..., 2] = 100                                  # red in BGRA order
    mono = np.full((2, 2), 7, np.uint8)
    store.offer(frame("a", pixels=bgr, channel_order="bgr"))
    store.offer(frame("b", pixels=bgra, channel_order="bgr"))
    store.offer(frame("c", pixels=mono))
    store.encode_pending(model)
    a, b, c = model.batches[0]
    assert a[0, 0].tolist() == [0, 0, 200]
    assert b[0, 0].tolist() == [100, 0, 0]
    assert c.shape == (2, 2)                            # mono: the encoder's as_rgb repeats it


def test_compressed_frames_are_decoded_in_the_worker_and_bad_ones_rejected():
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 10, 3), (10, 20, 30), np.uint8)).save(buf, "PNG")
    store = FrameStore(["front", "rear"], 2)
    model = FakeModel()
    store.offer(frame("front", pixels=None, compressed=buf.getvalue(), fmt="png"))
    store.offer(frame("rear", pixels=None, compressed=b"\x89PNG\r\n\x1a\n" + b"\0" * 20, fmt="png"))
    cached = store.encode_pending(model)
    assert [c.camera for c in cached] == ["front"]
    assert model.batches[0][0].shape == (8, 10, 3)
    st = store.stats()["rear"]
    assert (st.received, st.rejected, st.encoded) == (1, 1, 0)
    assert "cannot decode png" in st.last_reject


def test_encoder_failure_is_counted_and_raised():
    store = FrameStore(["front"], 2)
    store.offer(frame())
    with pytest.raises(RuntimeError):
        store.encode_pending(FakeModel(fail=True))
    assert store.encode_errors == 1 and "encoder exploded" in store.last_encode_error


def test_select_prefers_newest_encoded_frame():
    store = FrameStore(["front"], 4)
    model = FakeModel()
    store.offer(frame(t=NOW - 2 * S // 10))
    store.encode_pending(model)
    store.offer(frame(t=NOW - S // 10))                # pending, newer
    got = store.select("front", NOW, max_age_s=2.0)
    assert got.encoded and got.stamp_ns == NOW - 2 * S // 10


def test_select_prefers_a_fresh_frame_the_decoder_holds_already():
    store = FrameStore(["front"], 4)
    model = FakeModel()
    for t in (NOW - 3 * S, NOW - 15 * S // 10, NOW - S // 2):
        store.offer(frame(t=t))
        store.encode_pending(model)
    by_stamp = {f.stamp_ns: f for f in store.cameras["front"].cache}
    in_decoder = {by_stamp[NOW - 3 * S].seq, by_stamp[NOW - 15 * S // 10].seq}

    def ready(f):
        return f.seq in in_decoder
    # the newest frame whose image tokens are cached wins over a newer one that is not...
    assert store.select("front", NOW, 2.0, ready=ready).stamp_ns == NOW - 15 * S // 10
    # ... while it is fresh enough; then the newest encoded frame
    assert store.select("front", NOW, 1.0, ready=ready).stamp_ns == NOW - S // 2
    # a requested stamp is still the closest frame, cached or not
    assert store.select("front", NOW, 5.0, stamp_ns=NOW - S // 2, ready=ready).stamp_ns == NOW - S // 2
    assert store.select("front", NOW, 2.0).stamp_ns == NOW - S // 2          # no predicate: newest


def test_select_uses_pending_frame_when_no_encoded_frame_is_fresh():
    store = FrameStore(["front"], 4)
    model = FakeModel()
    store.offer(frame(t=NOW - 5 * S))
    store.encode_pending(model)
    store.offer(frame(t=NOW - S // 10))
    got = store.select("front", NOW, max_age_s=2.0)
    assert not got.encoded and got.stamp_ns == NOW - S // 10


def test_no_frame_yet_and_too_old_messages():
    store = FrameStore(["front"], 4)
    with pytest.raises(FrameUnavailable, match="no frame received yet from camera 'front'"):
        store.select("front", NOW, 2.0)
    store.offer(frame(t=NOW - 5 * S))
    with pytest.raises(FrameUnavailable) as e:
        store.select("front", NOW, 2.0)
    assert str(e.value) == "no frame newer than 2 s from camera 'front' (latest is 5.000 s old)"
    # max_frame_age_s 0: no limit
    assert store.select("front", NOW, 0.0).stamp_ns == NOW - 5 * S


def test_requested_stamp_picks_closest_cached_frame():
    store = FrameStore(["front"], 8)
    model = FakeModel()
    for ms in (900, 600, 300):
        store.offer(frame(t=NOW - ms * S // 1000))
        store.encode_pending(model)
    got = store.select("front", NOW, 2.0, stamp_ns=NOW - 650 * S // 1000)
    assert got.stamp_ns == NOW - 600 * S // 1000
    got = store.select("front", NOW, 2.0, stamp_ns=NOW - 10 * S // 1000)
    assert got.stamp_ns == NOW - 300 * S // 1000


def test_requested_stamp_future_and_ancient():
    check_requested_stamp(0, NOW, 2.0)
    check_requested_stamp(NOW + S // 2, NOW, 2.0)       # within the tolerance
    with pytest.raises(FrameUnavailable, match="in the future: 5.000 s ahead"):
        check_requested_stamp(NOW + 5 * S, NOW, 2.0)
    with pytest.raises(FrameUnavailable, match="too old: 100.000 s before the node clock"):
        check_requested_stamp(NOW - 100 * S, NOW, 2.0)
    check_requested_stamp(NOW - 100 * S, NOW, 0.0)      # no age limit


def test_select_frame_on_a_tie_prefers_the_encoded_frame():
    cached = CachedFrame("front", "h", NOW - S, NOW - S, object(), 1.0, seq=1)
    pending = Frame("front", "h", NOW - S, NOW - S, pixels=np.zeros((1, 1, 3), np.uint8), seq=2)
    assert select_frame([pending, cached], "front", NOW, 2.0, stamp_ns=NOW - S) is cached


def test_encode_frame_on_demand_takes_the_pending_frame():
    store = FrameStore(["front"], 4)
    model = FakeModel()
    store.offer(frame(t=NOW - S // 10))
    pinned = store.select("front", NOW, 2.0)
    cached, now = store.encode_frame(model, pinned)
    assert now and cached.seq == pinned.seq and cached.vision_ms == 5.0
    assert store.cameras["front"].pending is None
    # encoding it again returns the cached frame without calling the model
    again, now = store.encode_frame(model, pinned)
    assert again is cached and not now and len(model.batches) == 1
    assert store.encode_frame(model, cached) == (cached, False)


def test_encode_frame_after_the_worker_encoded_it():
    store = FrameStore(["front"], 4)
    model = FakeModel()
    store.offer(frame(t=NOW - S // 10))
    pinned = store.select("front", NOW, 2.0)
    store.encode_pending(model)                         # the vision worker got there first
    cached, now = store.encode_frame(model, pinned)
    assert not now and cached.seq == pinned.seq and len(model.batches) == 1


def test_encode_frame_raises_for_a_bad_frame():
    store = FrameStore(["front"], 4)
    store.offer(frame(pixels=None, compressed=b"\xff\xd8\xff" + b"junk", fmt="jpeg"))
    pinned = store.select("front", NOW, 2.0)
    with pytest.raises(ImageError, match="cannot decode jpeg"):
        store.encode_frame(FakeModel(), pinned)


def test_wait_pending_wakes_on_offer():
    store = FrameStore(["front"], 1)
    assert not store.wait_pending(0.01)
    threading.Timer(0.05, lambda: store.offer(frame())).start()
    assert store.wait_pending(5.0)


def test_clear_keeps_counters():
    store = FrameStore(["front"], 2)
    store.offer(frame())
    store.encode_pending(FakeModel())
    store.clear()
    assert store.latest_cached("front") is None
    assert store.stats()["front"].encoded == 1


def test_hold_background_stops_the_worker_not_encoding_on_demand():
    store = FrameStore(["front"], 4)
    model = FakeModel()
    store.offer(frame(t=NOW - 2 * S))
    with store.hold_background():
        assert not store.wait_pending(0.05)            # the worker sees nothing to do while held
        assert store.encode_pending(model) == []       # ... nor takes frames if it was already past the wait
        assert store.cameras["front"].pending is not None and model.batches == []
        store.offer(frame(t=NOW - S))                   # frames keep arriving: the newest stays pending
        pending = store.cameras["front"].pending
        cached, encoded_now = store.encode_frame(model, pending)   # a question's frame, on demand
        assert encoded_now and cached.stamp_ns == NOW - S and len(model.batches) == 1
        store.offer(frame(t=NOW))
    woke = []
    with store.hold_background():
        t = threading.Thread(target=lambda: woke.append(store.wait_pending(5.0)))
        t.start()
        t.join(0.1)
        assert t.is_alive()                             # still waiting while held
    t.join(5.0)
    assert woke == [True]                               # released: the worker wakes at once
    assert [c.stamp_ns for c in store.encode_pending(model)] == [NOW]


class SlowModel(FakeModel):
    """An encode that runs until the test releases it or its Abort is requested (as ONNX Runtime's
    run stops at the next node)."""

    def __init__(self):
        super().__init__()
        self.started, self.release = threading.Event(), threading.Event()

    def encode(self, frames, channel_order="rgb", abort=None):
        stopped = threading.Event()
        if abort is not None:
            abort.on_request(stopped.set)
        self.started.set()
        while not self.release.wait(0.01):
            if stopped.is_set():
                raise EncodeAborted("the encode was aborted")
        return super().encode(frames, channel_order)


def background_encode(store, model):
    model.started.clear()
    worker = threading.Thread(target=lambda: store.encode_pending(model))
    worker.start()
    assert model.started.wait(5.0)
    return worker


@pytest.mark.parametrize("newer_frame", [False, True])
def test_an_answer_stops_a_background_encode_and_its_frame_stays_pending(newer_frame):
    store = FrameStore(["front"], 4)
    model = SlowModel()
    store.offer(frame(t=NOW - 2 * S))
    worker = background_encode(store, model)
    if newer_frame:
        store.offer(frame(t=NOW - S))
    entered = threading.Event()

    def prefill():
        with store.hold_background():           # a prefill waits for the running encode
            entered.set()
    waiter = threading.Thread(target=prefill)
    waiter.start()
    assert not entered.wait(0.2)
    model.release.set()
    assert entered.wait(5.0)
    worker.join(5.0)
    waiter.join(5.0)
    assert store.encodes_aborted == 0 and store.stats()["front"].encoded == 1

    model.release.clear()
    store.offer(frame(t=NOW - S // 2))
    worker = background_encode(store, model)
    if newer_frame:
        store.offer(frame(t=NOW))
    with store.hold_background(abort_running=True):  # an answer: the encode stops at once
        worker.join(5.0)
        assert not worker.is_alive() and not model.release.is_set()   # stopped, not finished
        assert store.encodes_aborted == 1 and store.stats()["front"].encoded == 1
        pending = store.cameras["front"].pending     # the aborted frame, or the newer one
        assert pending.stamp_ns == (NOW if newer_frame else NOW - S // 2)
        assert store.stats()["front"].dropped == (2 if newer_frame else 0)
    model.release.set()                              # the next encode runs to the end
    assert [c.stamp_ns for c in store.encode_pending(model)] == [pending.stamp_ns]


def test_an_aborted_encode_requeues_only_frames_that_decoded():
    """A frame that could not be decoded was counted as rejected once: an abort does not put it
    back to be rejected again."""
    store = FrameStore(["front", "rear"], 4)
    model = SlowModel()
    store.offer(frame("front", NOW - S))
    store.offer(frame("rear", NOW - S, pixels=None, compressed=b"\xff\xd8\xff" + b"junk", fmt="jpeg"))
    worker = background_encode(store, model)
    with store.hold_background(abort_running=True):
        worker.join(5.0)
        assert not worker.is_alive() and store.encodes_aborted == 1
        assert store.cameras["front"].pending is not None and store.cameras["rear"].pending is None
        assert store.stats()["rear"].rejected == 1


def test_stats_count_what_the_cache_holds_and_it_stays_bounded():
    """Diagnostics report the cache's memory (embeddings and kept frames): it grows to the cache size
    and no further, so that a memory check can tell a filling cache from a leak."""
    class Embedder(FakeModel):
        def encode(self, frames, channel_order="rgb", abort=None):
            return [types.SimpleNamespace(embeds=np.zeros((144, 8), np.float32), vision_ms=1.0) for _ in frames]

    image = np.zeros((48, 64, 3), np.uint8)
    per_frame = image.nbytes + 144 * 8 * 4
    for keep, expect in ((True, per_frame), (False, 144 * 8 * 4)):
        store = FrameStore(["front"], 3, keep_images=keep)
        for i in range(5):
            store.offer(frame(t=NOW - (5 - i) * S, pixels=image.copy()))
            store.encode_pending(Embedder())
            st = store.stats()["front"]
            assert (st.cached, st.cached_bytes) == (min(i + 1, 3), min(i + 1, 3) * expect), (keep, i, st)
    store = FrameStore(["front"], 3, keep_images=True)
    store.offer(frame(compressed=b"x" * 1000, fmt="jpeg"))
    store.cameras["front"].cache.append(CachedFrame("front", "h", NOW, NOW, None, 0.0, 1,
                                                    image=store.cameras["front"].pending))
    assert store.stats()["front"].cached_bytes == 1000
