//! Config and key reloads, keys kept out of logs and metrics, and the cluster source.

use super::*;

#[tokio::test]
async fn a_config_reload_during_a_stream_does_not_cut_it() {
    bounded(async {
        let dir = TempDir::new("reload");
        let local = engine(2, 50.0).await;
        let backends = format!("backends: [\"{}\"]\n", local.addr());
        let path = dir.file(
            "router.yaml",
            &format!("{backends}maxConcurrencyPerBackend: 2\n"),
        );
        let r = router(&std::fs::read_to_string(&path).unwrap(), vec![]).await;
        let watch = crate::router::sources::spawn_config_watch(
            r.state().clone(),
            path.clone(),
            vec![],
            true,
            Duration::from_millis(20),
        );
        let stream = hold_stream(r.addr(), 40).await;
        // Written while the stream runs; a different size so the change shows at once.
        std::fs::write(
            &path,
            format!(
                "{backends}maxConcurrencyPerBackend: 1\nqueue: {{limit: 5, timeoutSeconds: 7}}\n"
            ),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.state().config().queue.timeout_seconds != 7 {
            assert!(Instant::now() < deadline, "config never reloaded");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let text = read_all(stream).await;
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        // The role chunk, 40 tokens, the finish chunk and [DONE].
        assert_eq!(text.matches("data: ").count(), 40 + 3, "{text}");
        // An invalid file keeps the previous config.
        std::fs::write(&path, "queue: [").unwrap();
        wait_metrics(&r, |t| {
            sample(
                t,
                "spillway_router_config_reloads_total{outcome=\"invalid\"}",
            ) == Some(1.0)
        })
        .await;
        assert_eq!(r.state().config().max_concurrency_per_backend, 1);
        watch.abort();
        r.stop().await;
        local.stop().await.unwrap();
    })
    .await;
}

/// Collects formatted tracing output of the current thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// One thread, so every task's logs reach the thread-local subscriber.
#[tokio::test(flavor = "current_thread")]
async fn the_provider_key_reaches_the_provider_and_never_the_logs_or_metrics() {
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let secret = "sk-live-VERY-SECRET-4242";
    bounded(async {
        let dir = TempDir::new("key");
        let key = dir.file("p", &format!("{secret}\n"));
        let dead_key = dir.file("down", secret);
        // Closes every connection at once; held by the test, so no other test can take its
        // port (as one could a port merely bound and let go).
        let closing = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = closing.local_addr().unwrap();
        let closer = tokio::spawn(async move {
            while let Ok((s, _)) = closing.accept().await {
                drop(s);
            }
        });
        let p = provider("p", secret, FaultConfig::default()).await;
        // A dead provider first, so failures get logged too.
        let yaml = format!(
            "burst:\n  providers:\n  - {{name: down, url: \"http://{dead}/v1\", model: x, apiKeyFile: \"{dead_key}\"}}\n{}",
            provider_yaml("p", &p, &key, "")
        );
        let r = router(&yaml, vec![]).await;
        // The client's own credentials must not reach the provider (it would answer 401).
        let reply = call(
            r.addr(),
            Method::POST,
            "/v1/chat/completions",
            &[("authorization", "Bearer client-token")],
            chat(2, false),
        )
        .await;
        assert_eq!(served_by(&reply), "p-model");
        let s = read_all(hold_stream(r.addr(), 2).await).await;
        assert!(s.contains("[DONE]"));
        let metrics = get(r.addr(), "/metrics").await.text();
        assert!(!metrics.contains(secret));
        assert!(!format!("{:?}", r.state().config()).contains(secret));
        closer.abort();
        r.stop().await;
        p.stop().await.unwrap();
    })
    .await;
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("upstream failed before a response"),
        "nothing captured:\n{text}"
    );
    assert!(!text.contains(secret), "key in logs:\n{text}");
    assert!(!text.contains("VERY-SECRET"), "key in logs:\n{text}");
}

#[tokio::test]
async fn a_rotated_key_file_applies_without_a_restart() {
    bounded(async {
        let dir = TempDir::new("rotate");
        let key = dir.file("p", "sk-old");
        let p = provider("p", "sk-new", FaultConfig::default()).await;
        let yaml = format!(
            "queue: {{timeoutSeconds: 1}}\nburst:\n  providers:\n{}",
            provider_yaml("p", &p, &key, "")
        );
        let r = router(&yaml, vec![]).await;
        // Refused: it waits for an engine (none yet) rather than passing on the provider's 401.
        let reply = post(r.addr(), chat(1, false)).await;
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            reply.text()
        );
        std::fs::write(&key, "sk-new\n").unwrap();
        r.state().refresh_keys();
        assert_eq!(served_by(&post(r.addr(), chat(1, false)).await), "p-model");
        r.stop().await;
        p.stop().await.unwrap();
    })
    .await;
}

/// In a cluster the EndpointSlices are the engines: the router starts with none and unready,
/// whatever static lists it was given, before its watch has even started.
#[tokio::test]
async fn in_a_cluster_it_starts_unready_and_without_engines() {
    bounded(async {
        let r = router_with(
            "backends: [\"127.0.0.1:9\"]",
            vec!["127.0.0.1:10".into()],
            |o| o.in_cluster = true,
        )
        .await;
        let ready = get(r.addr(), "/readyz").await;
        assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            ready.text().contains("engine endpoints"),
            "{}",
            ready.text()
        );
        assert!(r.state().backends().is_empty());
        r.stop().await;
    })
    .await;
}
