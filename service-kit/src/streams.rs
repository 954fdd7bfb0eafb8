//! A cap on the long-lived server streams a process holds open (watches, event streams):
//! each open stream holds a [`StreamSlot`]; past the cap a new one is refused with
//! RESOURCE_EXHAUSTED at once, and a slot frees when its stream is dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::Error;

/// The cap, shared by every stream kind it covers (clones share the count).
#[derive(Debug, Clone)]
pub struct StreamCap {
    open: Arc<AtomicUsize>,
    max: usize,
    what: &'static str,
}

/// One open stream's place under a [`StreamCap`]; dropping it frees the place.
#[derive(Debug)]
pub struct StreamSlot(Arc<AtomicUsize>);

impl StreamSlot {
    /// `stream`, holding this slot until the stream is dropped.
    pub fn hold<S: futures::Stream>(self, stream: S) -> impl futures::Stream<Item = S::Item> {
        use futures::StreamExt;
        stream.map(move |item| {
            let _held = &self;
            item
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl StreamCap {
    /// At most `max` open streams; `what` names them in the refusal ("placement watches").
    pub fn new(max: usize, what: &'static str) -> Self {
        Self {
            open: Arc::default(),
            max,
            what,
        }
    }

    /// A place for one more stream, or RESOURCE_EXHAUSTED when `max` are open.
    pub fn take(&self) -> Result<StreamSlot, Error> {
        let taken = self.open.fetch_add(1, Ordering::AcqRel);
        let slot = StreamSlot(self.open.clone());
        if taken >= self.max {
            return Err(Error::ResourceExhausted(format!(
                "{} {} are open, the most this server allows; retry later",
                self.max, self.what
            )));
        }
        Ok(slot)
    }

    /// How many streams hold a place now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_cap_and_frees_on_drop() {
        let cap = StreamCap::new(2, "watches");
        let a = cap.take().unwrap();
        let _b = cap.take().unwrap();
        let err = cap.take().unwrap_err();
        assert!(matches!(&err, Error::ResourceExhausted(m) if m.starts_with("2 watches are open")));
        assert_eq!(cap.open(), 2, "a refused take holds no place");
        drop(a);
        assert_eq!(cap.open(), 1);
        cap.clone().take().unwrap();
    }
}
