//! Serving threads: one port, one routing state, connections packed then spread.

use super::*;

#[tokio::test]
async fn serving_threads_share_one_port_and_one_routing_state() {
    bounded(async {
        let local = engine(1, 50.0).await;
        let yaml = format!(
            "listen: 127.0.0.1:0\nbackends: [\"{}\"]\nmaxConcurrencyPerBackend: 1\nqueue: {{limit: 0}}\nburst: {{mode: Never}}\n",
            local.addr()
        );
        let opts = RouterOptions {
            config: RouterConfig::from_yaml(&yaml).unwrap(),
            ..Default::default()
        };
        let r = RouterServer::start_threads(opts, 2).unwrap();
        let held = hold_stream(r.addr(), 25).await;
        // Whichever thread takes them, the engine's one slot is taken: no queue, 503 at once.
        for _ in 0..4 {
            let reply = post(r.addr(), chat(1, false)).await;
            assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(reply.json()["error"]["code"], "queue_full");
        }
        let stopping = tokio::spawn(r.stop());
        let text = read_all(held).await;
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        stopping.await.unwrap();
        local.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn connections_pack_onto_one_thread_then_spread_and_are_counted_out() {
    bounded(async {
        let opts = RouterOptions {
            config: RouterConfig::from_yaml("listen: 127.0.0.1:0\nburst: {mode: Never}\n").unwrap(),
            ..Default::default()
        };
        let r = RouterServer::start_threads(opts, 2).unwrap();
        let mut clients = Vec::new();
        for _ in 0..12 {
            let mut s = TcpStream::connect(r.addr()).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nhost: r\r\n\r\n")
                .await
                .unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 512];
            while !got.ends_with(b"ok\n") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(
                    n > 0,
                    "closed before an answer: {:?}",
                    String::from_utf8_lossy(&got)
                );
                got.extend_from_slice(&buf[..n]);
            }
            assert!(
                got.starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&got)
            );
            clients.push(s);
        }
        // Every connection answered; the first thread holds its 8, the second the rest.
        assert_eq!(r.connections(), vec![8, 4]);
        drop(clients);
        while r.connections() != vec![0, 0] {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        r.stop().await;
    })
    .await;
}
