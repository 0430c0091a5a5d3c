//! The cold-burst peer for `bench/run.sh`: the least any server can do for a burst of requests
//! that all wait for one mint, so the bench can show what the load generator and the machine
//! cost on their own.
//!
//! It listens on a Unix socket (backlog 4096, as keybroker), reads each connection's peer
//! credentials (as keybroker must), reads a request up to the end of its headers, and holds it
//! until `DELAY_MS` after the first request arrived. Then every held request, and every later
//! one, gets the same pre-rendered 200 with `BODY_FILE` as its body. No routing, no access
//! check, no ledger, no provider: a floor, not a server. It prints `listening` once clients can
//! connect, and raises its open-file limit as keybroker does.
//!
//! ```text
//! cold_peer SOCKET BODY_FILE DELAY_MS
//! ```
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixSocket, UnixStream};
use tokio::sync::watch;

struct Peer {
    /// The whole answer: status line, headers and body.
    answer: Vec<u8>,
    delay: Duration,
    /// Set by the first request, which starts the "mint".
    started: AtomicBool,
    ready: watch::Sender<bool>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, body_file, delay_ms] = args.as_slice() else {
        eprintln!("usage: cold_peer SOCKET BODY_FILE DELAY_MS");
        std::process::exit(64);
    };
    let body = std::fs::read(body_file)?;
    let Ok(delay_ms) = delay_ms.parse::<u64>() else {
        eprintln!("cold_peer: DELAY_MS must be a whole number of milliseconds, not {delay_ms:?}");
        std::process::exit(64);
    };
    let mut answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncache-control: no-store\r\ncontent-length: {}\r\ndate: {}\r\n\r\n",
        body.len(),
        httpdate_now(),
    )
    .into_bytes();
    answer.extend_from_slice(&body);
    let peer = Arc::new(Peer {
        answer,
        delay: Duration::from_millis(delay_ms),
        started: AtomicBool::new(false),
        ready: watch::channel(false).0,
    });

    keybroker::daemon::raise_fd_limit();
    let _ = std::fs::remove_file(socket);
    let listener = UnixSocket::new_stream()?;
    listener.bind(socket)?;
    let listener = listener.listen(4096)?;
    println!("listening");
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: a slower floor, not a dead one.
                eprintln!("cold_peer: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if stream.peer_cred().is_err() {
            continue;
        }
        tokio::spawn(serve(Arc::clone(&peer), stream));
    }
}

async fn serve(peer: Arc<Peer>, mut stream: UnixStream) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        // One request: up to the blank line ending its headers (the bench sends no bodies).
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        buf.drain(..end);
        if !*peer.ready.borrow() {
            if !peer.started.swap(true, Ordering::AcqRel) {
                let minter = Arc::clone(&peer);
                tokio::spawn(async move {
                    tokio::time::sleep(minter.delay).await;
                    minter.ready.send_replace(true);
                });
            }
            if peer
                .ready
                .subscribe()
                .wait_for(|ready| *ready)
                .await
                .is_err()
            {
                return;
            }
        }
        if stream.write_all(&peer.answer).await.is_err() {
            return;
        }
    }
}

/// The current time as an HTTP date (`Tue, 24 Nov 2026 03:00:00 GMT`), for a realistic header.
fn httpdate_now() -> String {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::OffsetDateTime::now_utc()
        .format(format)
        .unwrap_or_default()
}
