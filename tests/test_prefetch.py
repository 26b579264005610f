"""The device prefetch: batches in order, a data state that counts the batches taken (not those read ahead), the
waiting time, errors and closing."""

import time

import pytest

from cab_jax.prefetch import DevicePrefetch


class Counting:
    """A checkpointable iterator of 0, 1, 2, ... (state: the next step), optionally slow or failing."""

    def __init__(self, delay_s=0.0, fail_at=None):
        self.step, self.delay_s, self.fail_at, self.closed = 0, delay_s, fail_at, False

    def __next__(self):
        time.sleep(self.delay_s)
        if self.step == self.fail_at:
            raise RuntimeError(f"bad record at step {self.step}")
        self.step += 1
        return self.step - 1

    def get_state(self):
        return {"step": self.step}

    def close(self):
        self.closed = True


def test_batches_in_order_and_the_state_of_the_batches_taken():
    source = Counting()
    feed = DevicePrefetch(source, put=lambda b: ("on device", b), size=2)
    assert feed.get_state() == {"step": 0}
    assert [next(feed) for _ in range(3)] == [("on device", 0), ("on device", 1), ("on device", 2)]
    deadline = time.time() + 5
    while source.step < 6 and time.time() < deadline:  # 2 read ahead in the queue, 1 waiting to enter it
        time.sleep(0.01)
    time.sleep(0.1)
    assert source.step == 6 and feed.get_state() == {"step": 3}  # what a checkpoint must resume from
    feed.close()
    assert source.closed


def test_the_wait_for_a_slow_iterator_is_counted():
    feed = DevicePrefetch(Counting(delay_s=0.05), put=lambda b: b)
    for _ in range(4):
        next(feed)
    assert 0.1 < feed.take_wait_s() < 1.0 and feed.take_wait_s() == 0.0
    feed.close()


def test_an_error_in_the_iterator_reaches_the_consumer():
    feed = DevicePrefetch(Counting(fail_at=2), put=lambda b: b)
    assert [next(feed), next(feed)] == [0, 1]
    with pytest.raises(RuntimeError, match="bad record at step 2"):
        next(feed)
    feed.close()


def test_close_with_a_full_queue_stops_the_thread():
    source = Counting()
    feed = DevicePrefetch(source, put=lambda b: b, size=1)
    time.sleep(0.2)
    feed.close()
    assert source.closed and not feed._thread.is_alive()
    with pytest.raises(ValueError):
        DevicePrefetch(Counting(), put=lambda b: b, size=0)
