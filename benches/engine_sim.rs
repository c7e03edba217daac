//! engine-sim's own throughput on loopback: 32 keep-alive clients sending one-token chat
//! completions for 3 s. `cargo bench --bench engine_sim`. A rough figure, to know how much
//! load the simulated engine can put behind a router in other benchmarks.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use spillway::engine_sim::{EngineSimConfig, EngineSimServer};
use tokio::net::TcpStream;

const CLIENTS: usize = 32;
const SECONDS: u64 = 3;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let srv = EngineSimServer::start(EngineSimConfig {
            model: "m1".into(),
            prefill: Duration::ZERO,
            tokens_per_second: 1e6,
            max_concurrency: 1000,
            ..Default::default()
        })
        .await
        .expect("engine-sim starts");
        let addr = srv.addr();
        let body = Bytes::from(
            r#"{"model":"m1","messages":[{"role":"user","content":"abcdefgh"}],"max_tokens":1}"#,
        );
        let deadline = Instant::now() + Duration::from_secs(SECONDS);
        let workers: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let body = body.clone();
                tokio::spawn(async move {
                    let stream = TcpStream::connect(addr).await.expect("connect");
                    let (mut sender, conn) =
                        hyper::client::conn::http1::handshake(TokioIo::new(stream))
                            .await
                            .expect("handshake");
                    tokio::spawn(conn);
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        sender.ready().await.expect("connection open");
                        let req = Request::post("/v1/chat/completions")
                            .header("host", "127.0.0.1")
                            .body(Full::new(body.clone()))
                            .expect("request");
                        let resp = sender.send_request(req).await.expect("answer");
                        assert_eq!(resp.status(), StatusCode::OK);
                        resp.into_body().collect().await.expect("body");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let mut total = 0;
        for w in workers {
            total += w.await.expect("worker");
        }
        println!(
            "engine-sim loopback: {total} requests in {SECONDS} s = {} req/s ({CLIENTS} keep-alive clients, 1 token each)",
            total / SECONDS
        );
        srv.stop().await.expect("engine-sim stops");
    });
}
