//! moto (S3 + IAM, signatures checked) and the IAM mirror, hosted by `tests/e2e/moto_mirror.py`.
//! The fake cloud mints through [`Moto::create_key`] so the keys keybroker serves are real S3
//! keys there, and revokes through [`Moto::delete_key`] so revoked keys really stop working.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;

use serde_json::{json, Value};

use crate::harness::{python, venv_bin};

struct Pipe {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

pub struct Moto {
    child: Mutex<Child>,
    pipe: Mutex<Pipe>,
    /// `http://127.0.0.1:PORT`, for S3 clients.
    pub endpoint: String,
}

impl Moto {
    /// Starts moto on a free loopback port and waits until its admin is made.
    pub fn start() -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/moto_mirror.py");
        let mut child = Command::new(python())
            .arg(script)
            .arg(port.to_string())
            .env_clear()
            .env("PATH", venv_bin().display().to_string() + ":/usr/bin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting {}: {e}; run ./scripts/test.sh to create the venv",
                    python().display()
                )
            });
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let ready: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("moto did not start ({e}): {line:?}"));
        assert_eq!(ready["ready"], true, "{line}");
        Moto {
            child: Mutex::new(child),
            pipe: Mutex::new(Pipe { stdin, stdout }),
            endpoint: ready["endpoint"].as_str().unwrap().to_string(),
        }
    }

    fn call(&self, request: Value) -> Value {
        let mut pipe = self.pipe.lock().unwrap();
        writeln!(pipe.stdin, "{request}").unwrap();
        pipe.stdin.flush().unwrap();
        let mut line = String::new();
        pipe.stdout.read_line(&mut line).unwrap();
        let answer: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("mirror answer ({e}): {line:?}"));
        assert!(answer.get("error").is_none(), "mirror {request}: {answer}");
        answer
    }

    /// A new IAM user with an allow-all policy and one access key: (key id, secret).
    pub fn create_key(&self, user: &str) -> (String, String) {
        let a = self.call(json!({"op": "create", "user": user}));
        (
            a["id"].as_str().unwrap().to_string(),
            a["secret"].as_str().unwrap().to_string(),
        )
    }

    /// Deletes the key: it stops working for S3 at once.
    pub fn delete_key(&self, user: &str, id: &str) {
        self.call(json!({"op": "delete", "user": user, "id": id}));
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}
