//! `to = "mqtt"` against a real Mosquitto of the test's own: messages come in over MQTT, a
//! rule republishes each to a topic made from its output, and a real MQTT subscriber reads
//! every one; a topic that resolves to a wildcard is a 9321 record.

use std::collections::HashSet;
use std::time::Duration;

use iotfwd::config::mqtt::{MqttConfig, MqttSourceConfig};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use super::harness::{Daemon, eventually, metric, unique};
use super::source_mqtt::{Mosquitto, publish_all, stream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_reach_a_real_subscriber_and_a_wildcard_topic_is_9321() {
    const N: usize = 1_000;
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    // The subscriber, subscribed before anything is published.
    let mut options = MqttOptions::new(
        format!("sub-{}", uuid::Uuid::new_v4().simple()),
        "127.0.0.1",
        mosquitto.port,
    );
    options.set_keep_alive(Duration::from_secs(30));
    let (subscriber, mut events) = AsyncClient::new(options, 100);
    subscriber
        .subscribe("/out/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        match events.poll().await.expect("the subscriber connects") {
            Event::Incoming(Packet::SubAck(_)) => break,
            _ => continue,
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("command.toml"),
        "sql = '''SELECT seq, deviceName() AS device FROM \"/p1/#\"'''\n\
         [[action]]\nto = \"mqtt\"\ntopic = \"/out/${device}/command\"\nqos = 1\n",
    )
    .unwrap();
    std::fs::write(
        rules.join("wildcard.toml"),
        "sql = '''SELECT seq, 'a/+' AS level FROM \"/p1/#\" WHERE seq = 0'''\n\
         [[action]]\nto = \"mqtt\"\ntopic = \"/out/${level}\"\n",
    )
    .unwrap();
    let url = mosquitto.url();
    let daemon = Daemon::start_without_broker(&rules, |c| {
        c.subscription.enabled = false;
        let mut mqtt = MqttConfig::new(url);
        mqtt.client_id = unique("out");
        c.mqtt = Some(mqtt);
        c.source.mqtt = Some(MqttSourceConfig::new(&["/p1/#"]));
    })
    .await;
    eventually("the MQTT source to subscribe", || async {
        let health = daemon.get_json("/api/v1/health").await;
        (health["mqtt"]["connected"] == true).then_some(())
    })
    .await;
    publish_all(mosquitto.port, stream(N)).await;

    let mut seen = HashSet::new();
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        while seen.len() < N {
            match events.poll().await.expect("the subscriber stays connected") {
                Event::Incoming(Packet::Publish(p)) => {
                    let body: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                    let device = body["device"].as_str().unwrap().to_owned();
                    assert_eq!(p.topic, format!("/out/{device}/command"));
                    assert_eq!(p.qos, QoS::AtLeastOnce);
                    seen.insert(body["seq"].as_u64().unwrap());
                }
                _ => continue,
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the subscriber read {} of {N} republished messages",
        seen.len()
    );
    // The subscriber may read a message before its PUBACK reached iotfwd.
    let action = [
        ("rule", "command"),
        ("action", "mqtt:/out/${device}/command"),
    ];
    eventually("every republish acknowledged", || async {
        let scrape = daemon.metrics().await;
        (metric(&scrape, "iotfwd_action_success_total", &action) == N as f64).then_some(())
    })
    .await;
    let invalid = daemon.get_json("/api/v1/logs?status=9321").await;
    assert_eq!(invalid["count"], 1, "{invalid}");
    assert!(
        invalid.to_string().contains("wildcard"),
        "the 9321 record says why: {invalid}"
    );
    daemon.stop().await;
}
