//! The way out to a client's stream: what the broker read from etcd for a client and
//! the client has not taken yet. Bounded in bytes, not in messages, so a stream of large
//! values holds no more memory than one of small ones; and a client that leaves it full
//! for longer than its patience has its stream ended (Unavailable, as etcd ends a slow
//! watcher), what it had not taken dropped at once, and its sender told to stop, so the
//! etcd stream behind it is cancelled too.
//!
//! Every streaming answer of the broker (Watch, LeaseKeepAlive, RangeStream, Observe)
//! goes through one.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prost::Message;
use tokio::sync::Notify;
use tonic::Status;

/// Bytes of messages a client may leave untaken before the broker stops reading etcd
/// for it. One message larger than this still goes, alone.
pub const BUDGET: usize = 256 << 10;

/// Why a message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// The client went away.
    Closed,
    /// The client left its outbox full for longer than its patience; its stream has
    /// been ended.
    Slow,
}

/// The sending side; clones share one outbox. The stream ends, after what is queued,
/// when the last clone is dropped.
pub struct Outbox<T> {
    holder: Arc<Holder<T>>,
}

impl<T> Clone for Outbox<T> {
    fn clone(&self) -> Self {
        Self {
            holder: self.holder.clone(),
        }
    }
}

/// A sender that does not keep the stream open.
pub struct WeakOutbox<T> {
    holder: Weak<Holder<T>>,
}

impl<T> WeakOutbox<T> {
    pub fn upgrade(&self) -> Option<Outbox<T>> {
        self.holder.upgrade().map(|holder| Outbox { holder })
    }
}

/// The receiving side, handed to tonic as the response stream.
pub struct Inbox<T> {
    shared: Arc<Shared<T>>,
}

struct Holder<T> {
    shared: Arc<Shared<T>>,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Room was made, or the client went away.
    room: Notify,
    budget: usize,
    patience: Duration,
    /// What an ended slow stream is told.
    slow: &'static str,
    /// Counts the streams ended so.
    ended_slow: Counter,
}

struct State<T> {
    queue: VecDeque<(T, usize)>,
    bytes: usize,
    /// Set once: `Some(status)` to end with it after the queue, `None` to just end.
    end: Option<Option<Status>>,
    /// The client (tonic) dropped the stream.
    closed: bool,
    reader: Option<Waker>,
}

/// An outbox for a stream whose client gets `slow` as an Unavailable status if it
/// leaves `budget` bytes untaken for `patience`; `ended_slow` counts such ends.
pub fn outbox<T>(
    budget: usize,
    patience: Duration,
    slow: &'static str,
    ended_slow: Counter,
) -> (Outbox<T>, Inbox<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            bytes: 0,
            end: None,
            closed: false,
            reader: None,
        }),
        room: Notify::new(),
        budget,
        patience,
        slow,
        ended_slow,
    });
    let holder = Arc::new(Holder {
        shared: shared.clone(),
    });
    (Outbox { holder }, Inbox { shared })
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the stream (first end wins), waking the reader.
    fn end(&self, status: Option<Status>, drop_queued: bool) {
        let mut s = self.lock();
        if s.end.is_none() {
            s.end = Some(status);
        }
        if drop_queued {
            s.queue.clear();
            s.bytes = 0;
        }
        if let Some(w) = s.reader.take() {
            w.wake();
        }
        drop(s);
        self.room.notify_waiters();
    }
}

impl<T> Drop for Holder<T> {
    fn drop(&mut self) {
        self.shared.end(None, false);
    }
}

impl<T: Message> Outbox<T> {
    /// Queues `msg`, waiting for room for at most the outbox's patience.
    pub async fn send(&self, msg: T) -> Result<(), Gone> {
        let size = msg.encoded_len();
        let shared = &self.holder.shared;
        let mut msg = Some(msg);
        let deadline = tokio::time::Instant::now() + shared.patience;
        loop {
            let room = shared.room.notified();
            tokio::pin!(room);
            {
                let mut s = shared.lock();
                if s.closed || s.end.is_some() {
                    return Err(Gone::Closed);
                }
                if s.queue.is_empty() || s.bytes + size <= shared.budget {
                    s.bytes += size;
                    s.queue.push_back((msg.take().expect("queued once"), size));
                    if let Some(w) = s.reader.take() {
                        w.wake();
                    }
                    return Ok(());
                }
                // Registered before the lock is let go, so no room made meanwhile is
                // missed.
                room.as_mut().enable();
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                shared.ended_slow.inc();
                shared.end(Some(Status::unavailable(shared.slow)), true);
                return Err(Gone::Slow);
            }
        }
    }
}

impl<T> Outbox<T> {
    /// Ends the stream with `status`, after what is queued; later sends fail. Taking no
    /// room, it gets through a full outbox.
    pub fn fail(&self, status: Status) {
        self.holder.shared.end(Some(status), false);
    }

    /// Resolves once the client has gone away or the stream was ended.
    pub async fn closed(&self) {
        let shared = &self.holder.shared;
        loop {
            let room = shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let s = shared.lock();
                if s.closed || s.end.is_some() {
                    return;
                }
            }
            room.await;
        }
    }

    pub fn downgrade(&self) -> WeakOutbox<T> {
        WeakOutbox {
            holder: Arc::downgrade(&self.holder),
        }
    }
}

impl<T> tokio_stream::Stream for Inbox<T> {
    type Item = Result<T, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut s = self.shared.lock();
        if let Some((msg, size)) = s.queue.pop_front() {
            s.bytes -= size;
            drop(s);
            self.shared.room.notify_waiters();
            return Poll::Ready(Some(Ok(msg)));
        }
        match &mut s.end {
            Some(end) => Poll::Ready(end.take().map(Err)),
            None => {
                s.reader = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl<T> Drop for Inbox<T> {
    fn drop(&mut self) {
        {
            let mut s = self.shared.lock();
            s.closed = true;
            s.queue.clear();
            s.bytes = 0;
        }
        self.shared.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_client::proto::PbPutRequest;
    use tokio_stream::StreamExt;

    fn msg(bytes: usize) -> PbPutRequest {
        PbPutRequest {
            value: vec![b'x'; bytes],
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_in_bytes_and_a_large_message_still_goes_alone() {
        let (tx, mut rx) = outbox(1000, Duration::from_secs(5), "slow", Counter::default());
        // A message above the budget goes when nothing is queued...
        tx.send(msg(5000)).await.unwrap();
        // ...and then nothing more fits until it is taken.
        let blocked = tokio::time::timeout(Duration::from_secs(1), tx.send(msg(10))).await;
        assert!(blocked.is_err(), "a full outbox took another message");
        assert_eq!(rx.next().await.unwrap().unwrap().value.len(), 5000);
        // Ten messages of 92 bytes encoded fit in 1000; an eleventh does not.
        for _ in 0..10 {
            tx.send(msg(90)).await.unwrap();
        }
        let blocked = tokio::time::timeout(Duration::from_secs(1), tx.send(msg(90))).await;
        assert!(blocked.is_err(), "the outbox held more than its budget");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_ended_and_its_queue_dropped() {
        let ended = Counter::default();
        let (tx, mut rx) = outbox(100, Duration::from_secs(30), "too slow", ended.clone());
        tx.send(msg(90)).await.unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(tx.send(msg(90)).await, Err(Gone::Slow));
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert_eq!(tx.send(msg(1)).await, Err(Gone::Closed));
        assert_eq!(ended.get(), 1);
        // The client, reading at last, gets the end and nothing of what was queued.
        let end = rx.next().await.unwrap().unwrap_err();
        assert_eq!(end.code(), tonic::Code::Unavailable);
        assert_eq!(end.message(), "too slow");
        assert!(rx.next().await.is_none());
        // The sender learns it too, as a relay selecting on `closed` would.
        tokio::time::timeout(Duration::from_secs(1), tx.closed())
            .await
            .expect("closed() did not resolve for an ended stream");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_keeps_a_sender_going_and_the_stream_ends_with_the_senders() {
        let (tx, rx) = outbox(100, Duration::from_secs(1), "slow", Counter::default());
        let reader = tokio::spawn(async move {
            let mut rx = rx;
            let mut n = 0;
            while let Some(m) = rx.next().await {
                m.unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            n
        });
        let weak = tx.downgrade();
        for _ in 0..50 {
            tx.send(msg(60)).await.unwrap();
        }
        drop(tx);
        assert!(
            weak.upgrade().is_none(),
            "a weak sender kept the stream open"
        );
        assert_eq!(reader.await.unwrap(), 50);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_gets_through_a_full_outbox_after_what_is_queued() {
        let (tx, mut rx) = outbox(100, Duration::from_secs(1), "slow", Counter::default());
        tx.send(msg(90)).await.unwrap();
        tx.fail(Status::unavailable("etcdserver: server stopped"));
        assert_eq!(rx.next().await.unwrap().unwrap().value.len(), 90);
        let end = rx.next().await.unwrap().unwrap_err();
        assert_eq!(end.message(), "etcdserver: server stopped");
        assert!(rx.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_goes_away_stops_the_sender() {
        let (tx, rx) = outbox(100, Duration::from_secs(30), "slow", Counter::default());
        tx.send(msg(90)).await.unwrap();
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(msg(90)).await }
        });
        tokio::task::yield_now().await;
        drop(rx);
        assert_eq!(waiting.await.unwrap(), Err(Gone::Closed));
        tokio::time::timeout(Duration::from_secs(1), tx.closed())
            .await
            .expect("closed() did not resolve after the client left");
    }
}
