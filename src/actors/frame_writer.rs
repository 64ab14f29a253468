//! The write side of an NBD connection, shared by the session's reply writer
//! ([`super::session`]) and the proxy's upstream request writer (`crate::proxy::upstream`):
//! one task drains a queue of frames into a buffered socket and flushes as rarely as it can
//! without delaying anything.
//!
//! Why it waits one scheduler pass before flushing: requests finish in bursts (every write of
//! one Raft apply, a run of cache hits decoded from one socket read), and their frames reach
//! the queue one task after another. Flushing as soon as the queue looked empty sent most
//! frames in a system call of their own (measured on the proxy: one `sendto` per 4 KiB cache
//! hit); yielding once lets the rest of the burst join the same flush. A lone frame waits for
//! one pass of this thread's other ready tasks, a few microseconds.

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

/// Buffered bytes before the writer goes to the socket on its own, flush or not.
const WRITE_BUFFER_BYTES: usize = 256 * 1024;

/// Something to put on the wire: a header and a body (either may be empty).
pub trait Frame {
    fn head(&self) -> &[u8];
    fn body(&self) -> &[u8];
}

/// Writes every frame sent on `frames` until all senders are gone, then shuts the socket down.
/// Each frame is dropped once its bytes are buffered (frames may hold flow-control permits).
/// Returns the first write error; the caller decides whether it is worth logging.
pub async fn write_frames<W: AsyncWrite + Unpin, F: Frame>(
    socket: W,
    mut frames: mpsc::UnboundedReceiver<F>,
) -> std::io::Result<()> {
    let mut writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, socket);
    while let Some(first) = frames.recv().await {
        let mut next = Some(first);
        while let Some(frame) = next {
            writer.write_all(frame.head()).await?;
            writer.write_all(frame.body()).await?;
            drop(frame);
            next = match frames.try_recv() {
                Ok(frame) => Some(frame),
                // The queue looks empty: one scheduler pass for the rest of the burst.
                Err(_) => {
                    tokio::task::yield_now().await;
                    frames.try_recv().ok()
                }
            };
        }
        writer.flush().await?;
    }
    writer.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    struct TestFrame(Vec<u8>, Vec<u8>);

    impl Frame for TestFrame {
        fn head(&self) -> &[u8] {
            &self.0
        }
        fn body(&self) -> &[u8] {
            &self.1
        }
    }

    /// Frames arrive in queue order, head before body, and the socket is shut down once every
    /// sender is gone (the reader sees EOF).
    #[tokio::test]
    async fn frames_arrive_in_order_then_eof() {
        let (socket, mut peer) = tokio::io::duplex(1 << 20);
        let (sender, receiver) = mpsc::unbounded_channel();
        let mut expected = Vec::new();
        for index in 0u8..100 {
            let body = vec![index; usize::from(index) * 3];
            expected.push(index);
            expected.extend_from_slice(&body);
            sender.send(TestFrame(vec![index], body)).unwrap();
        }
        drop(sender);
        write_frames(socket, receiver).await.unwrap();
        let mut received = Vec::new();
        peer.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, expected);
    }

    /// A frame sent while the writer waits in its one scheduler pass is flushed with the
    /// burst: nothing is left buffered when the queue goes quiet.
    #[tokio::test]
    async fn a_frame_queued_during_the_yield_is_flushed_too() {
        let (socket, mut peer) = tokio::io::duplex(1 << 20);
        let (sender, receiver) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_frames(socket, receiver));
        sender
            .send(TestFrame(b"first".to_vec(), Vec::new()))
            .unwrap();
        tokio::task::yield_now().await;
        sender
            .send(TestFrame(b"second".to_vec(), Vec::new()))
            .unwrap();
        let mut received = [0u8; 11];
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            peer.read_exact(&mut received),
        )
        .await
        .expect("both frames are flushed without more traffic")
        .unwrap();
        assert_eq!(&received, b"firstsecond");
        drop(sender);
        writer.await.unwrap().unwrap();
    }

    /// A broken socket ends the writer with the error instead of spinning.
    #[tokio::test]
    async fn a_closed_peer_ends_the_writer_with_an_error() {
        let (socket, peer) = tokio::io::duplex(64);
        drop(peer);
        let (sender, receiver) = mpsc::unbounded_channel();
        sender.send(TestFrame(vec![1; 1024], Vec::new())).unwrap();
        let result = write_frames(socket, receiver).await;
        assert_eq!(
            result.expect_err("writing to a closed pipe fails").kind(),
            std::io::ErrorKind::BrokenPipe
        );
    }
}
