//! MQTT 5 user properties, both ways, against a real Mosquitto of the test's own: a device
//! publishes with user properties `messageId` and `traceId`, which become the message's
//! identity; a rule republishes it with `properties = { … }` templates, and a real MQTT 5
//! subscriber reads the identity (`topic`, `productKey`, `deviceName`, `messageId`, `traceId`,
//! `rule`) and the templates' values as user properties of what it receives. A message left
//! unacknowledged is redelivered from the MQTT 5 session, under the device's `messageId`.

use std::collections::HashMap;
use std::time::Duration;

use iotfwd::config::mqtt::{MqttConfig, MqttSourceConfig};
use lapin::ExchangeKind;
use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};

use super::harness::{BROKER, Daemon, eventually, metric, unique};
use super::rabbit::{channel, cleanup, declare_topic_exchange};
use super::source_mqtt::Mosquitto;

/// An MQTT 5 client of the test's Mosquitto, connected.
async fn client(port: u16, name: &str) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(unique(name), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 100);
    loop {
        match events.poll().await.expect("the MQTT 5 client connects") {
            Event::Incoming(Packet::ConnAck(_)) => return (client, events),
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_properties_carry_the_identity_in_and_out() {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let (subscriber, mut received) = client(mosquitto.port, "sub5").await;
    subscriber
        .subscribe("/out/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = received.poll().await.unwrap() {
            break;
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("command.toml"),
        "sql = '''SELECT seq, deviceName() AS device FROM \"/p1/#\"'''\n\
         [[action]]\nto = \"mqtt\"\ntopic = \"/out/${device}\"\n\
         properties = { site = \"site-${device}\", seq = \"${seq}\" }\n",
    )
    .unwrap();
    let url = mosquitto.url();
    let daemon = Daemon::start_without_broker(&rules, |c| {
        c.subscription.enabled = false;
        let mut mqtt = MqttConfig::new(url);
        mqtt.client_id = unique("v5");
        mqtt.protocol = "5".into();
        c.mqtt = Some(mqtt);
        c.source.mqtt = Some(MqttSourceConfig::new(&["/p1/#"]));
    })
    .await;
    eventually("the MQTT source to subscribe", || async {
        let health = daemon.get_json("/api/v1/health").await;
        (health["mqtt"]["connected"] == true).then_some(())
    })
    .await;

    // The device: one publish with an identity, one without.
    let (device, mut sent) = client(mosquitto.port, "dev5").await;
    let identity = PublishProperties {
        user_properties: vec![
            ("messageId".into(), "m5-1".into()),
            ("traceId".into(), "t5-1".into()),
        ],
        ..Default::default()
    };
    device
        .publish_with_properties(
            "/p1/dev1/user/update",
            QoS::AtLeastOnce,
            false,
            "{\"seq\":7}",
            identity,
        )
        .await
        .unwrap();
    device
        .publish(
            "/p1/dev2/user/update",
            QoS::AtLeastOnce,
            false,
            "{\"seq\":8}",
        )
        .await
        .unwrap();
    let mut acked = 0;
    while acked < 2 {
        if let Event::Incoming(Packet::PubAck(_)) = sent.poll().await.unwrap() {
            acked += 1;
        }
    }

    let mut by_seq: HashMap<u64, HashMap<String, String>> = HashMap::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while by_seq.len() < 2 {
            if let Event::Incoming(Packet::Publish(p)) = received.poll().await.unwrap() {
                let body: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                let properties = p.properties.map(|p| p.user_properties).unwrap_or_default();
                by_seq.insert(
                    body["seq"].as_u64().unwrap(),
                    properties.into_iter().collect(),
                );
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the subscriber read {} of 2", by_seq.len()));

    let first = &by_seq[&7];
    for (key, value) in [
        ("topic", "/p1/dev1/user/update"),
        ("productKey", "p1"),
        ("deviceName", "dev1"),
        ("messageId", "m5-1"),
        ("traceId", "t5-1"),
        ("rule", "command"),
        ("site", "site-dev1"),
        ("seq", "7"),
    ] {
        assert_eq!(
            first.get(key).map(String::as_str),
            Some(value),
            "{key}: {first:?}"
        );
    }
    // Without user properties the message gets ids of its own, forwarded the same way.
    let second = &by_seq[&8];
    assert_eq!(second["deviceName"], "dev2", "{second:?}");
    assert_eq!(second["site"], "site-dev2", "{second:?}");
    assert!(
        !second["messageId"].is_empty() && second["messageId"] != "m5-1",
        "{second:?}"
    );
    assert_eq!(second["traceId"].len(), 32, "{second:?}");

    // The records are found by the identity the device gave.
    let records = daemon.get_json("/api/v1/logs?messageId=m5-1").await;
    assert!(records["count"].as_u64().unwrap_or(0) >= 1, "{records}");
    assert!(records.to_string().contains("t5-1"), "{records}");
    let _ = device.disconnect().await;
    let _ = subscriber.disconnect().await;
    daemon.stop().await;
}

/// A message that must be redelivered (its forward failed for good and the dead-letter write
/// failed too) stays unacknowledged; the source reconnects and the broker redelivers it from the
/// MQTT 5 session, under the `messageId` the device gave, until the dead letter can be
/// written; then it is dead-lettered once and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_left_unacknowledged_is_redelivered_from_the_v5_session() {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let (_conn, ch) = channel(BROKER).await;
    let exchange = unique("out");
    let dead = unique("dead");
    // No queue is bound to `exchange`: the forward is unroutable (9332), for good.
    declare_topic_exchange(&ch, &exchange).await;
    // In the way: iotfwd declares its dead-letter exchange as a fanout.
    ch.exchange_declare(
        dead.as_str().into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("fwd.toml"),
        format!(
            "sql = '''SELECT seq FROM \"/p1/#\"'''\n[[action]]\nto = \"amqp\"\n\
             exchange = \"{exchange}\"\nrouting_key = \"r.k\"\n"
        ),
    )
    .unwrap();
    let (url, dlx) = (mosquitto.url(), dead.clone());
    let daemon = Daemon::start(&rules, move |c| {
        c.subscription.enabled = false;
        c.broker.as_mut().unwrap().dead_letter_exchange = dlx;
        let mut mqtt = MqttConfig::new(url);
        mqtt.client_id = unique("redo");
        mqtt.protocol = "5".into();
        c.mqtt = Some(mqtt);
        c.source.mqtt = Some(MqttSourceConfig::new(&["/p1/#"]));
    })
    .await;
    daemon.wait_ready().await;
    eventually("the MQTT source to subscribe", || async {
        let health = daemon.get_json("/api/v1/health").await;
        (health["mqtt"]["connected"] == true).then_some(())
    })
    .await;

    let id = unique("redo");
    let (device, mut sent) = client(mosquitto.port, "dev5").await;
    let identity = PublishProperties {
        user_properties: vec![("messageId".into(), id.clone())],
        ..Default::default()
    };
    device
        .publish_with_properties(
            "/p1/dev1/user/update",
            QoS::AtLeastOnce,
            false,
            "{\"seq\":1}",
            identity,
        )
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::PubAck(_)) = sent.poll().await.unwrap() {
            break;
        }
    }
    // Redelivered (about a second apart) while the dead letter cannot be written.
    eventually("the message delivered a second time", || async {
        let scrape = daemon.metrics().await;
        let received = metric(
            &scrape,
            "iotfwd_messages_received_total",
            &[("source", "mqtt")],
        );
        (received >= 2.0).then_some(())
    })
    .await;
    let uplinks = daemon
        .get_json(&format!("/api/v1/logs?messageId={id}&limit=100"))
        .await;
    assert!(
        uplinks.to_string().matches("\"uplink\"").count() >= 2,
        "each delivery recorded under the device's messageId: {uplinks}"
    );

    // The obstacle goes; the next redelivery is dead-lettered, and acknowledged: no more come.
    ch.exchange_delete(dead.as_str().into(), Default::default())
        .await
        .unwrap();
    let listed = eventually("the message dead-lettered", || async {
        let v = daemon.get_json("/api/v1/dlq").await;
        let l = v["deadLetters"].as_array().cloned().unwrap_or_default();
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["messageId"], id.as_str());
    let scrape = daemon.metrics().await;
    let settled = metric(
        &scrape,
        "iotfwd_messages_received_total",
        &[("source", "mqtt")],
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let scrape = daemon.metrics().await;
    assert_eq!(
        metric(
            &scrape,
            "iotfwd_messages_received_total",
            &[("source", "mqtt")]
        ),
        settled,
        "acknowledged once dead-lettered: not delivered again"
    );
    let _ = device.disconnect().await;
    daemon.stop().await;
    cleanup(&ch, &[&exchange, &dead], &[&dead]).await;
}
