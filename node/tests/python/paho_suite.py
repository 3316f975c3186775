"""Interoperability tests of Rampart with the Python paho-mqtt client (MQTT 3.1.1 and 5.0).

The broker under test is started by node/tests/interop_paho.rs, which passes its addresses in
RAMPART_TCP, RAMPART_WS, RAMPART_TLS, RAMPART_WSS (host:port) and its CA in RAMPART_CA.
Every wait is bounded; the suite runs in well under a minute.
"""

import os
import queue
import socket
import struct
import threading
import time
import unittest
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

WAIT = 5.0
V3, V5 = mqtt.MQTTv311, mqtt.MQTTv5


def addr(name):
    host, port = os.environ[name].rsplit(":", 1)
    return host, int(port)


def uid(prefix="t"):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Client:
    """A connected paho client whose received messages and events land in queues."""

    def __init__(self, version, client_id=None, clean=True, transport="tcp", endpoint="RAMPART_TCP",
                 tls=False, will=None, props=None, keepalive=30):
        self.version = version
        self.messages = queue.Queue()
        self.connacks = queue.Queue()
        self.disconnects = queue.Queue()
        self.client_id = client_id if client_id is not None else uid("c")
        kwargs = dict(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                      protocol=version, transport=transport)
        if version == V3:
            kwargs["clean_session"] = clean
        self.c = mqtt.Client(**kwargs)
        if transport == "websockets":
            self.c.ws_set_options(path="/mqtt")
        if tls:
            self.c.tls_set(ca_certs=os.environ["RAMPART_CA"])
        if will:
            self.c.will_set(**will)
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_connect = lambda c, u, f, rc, p: self.connacks.put((f, rc, p))
        self.c.on_disconnect = lambda c, u, f, rc, p: self.disconnects.put(rc)
        host, port = addr(endpoint)
        if tls:
            host = "localhost"
        connect_kwargs = dict(keepalive=keepalive)
        if version == V5:
            connect_kwargs["clean_start"] = clean
            if props is not None:
                connect_kwargs["properties"] = props
        self.c.connect(host, port, **connect_kwargs)
        self.c.loop_start()
        self.flags, self.rc, self.props = self.connacks.get(timeout=WAIT)

    def subscribe(self, topic, qos=0, **kwargs):
        done = threading.Event()
        result = {}

        def on_subscribe(c, u, mid, codes, p):
            result["codes"] = codes
            done.set()

        self.c.on_subscribe = on_subscribe
        if self.version == V5 and "options" in kwargs:
            self.c.subscribe(topic, options=kwargs["options"], properties=kwargs.get("properties"))
        else:
            self.c.subscribe(topic, qos, properties=kwargs.get("properties"))
        assert done.wait(WAIT), "no SUBACK"
        return [c.value if hasattr(c, "value") else c for c in result["codes"]]

    def publish(self, topic, payload, qos=0, retain=False, props=None):
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if qos:
            info.wait_for_publish(WAIT)
            assert info.is_published(), "publish not acknowledged"
        return info

    def get(self, timeout=WAIT):
        return self.messages.get(timeout=timeout)

    def nothing(self, timeout=0.5):
        try:
            m = self.messages.get(timeout=timeout)
        except queue.Empty:
            return True
        raise AssertionError(f"unexpected message on {m.topic}: {m.payload!r}")

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()

    def drop(self):
        """Vanishes without DISCONNECT (abnormal close)."""
        self.c.loop_stop()
        self.c.socket().close()


class Both:
    """Runs a test body for MQTT 3.1.1 and 5.0."""

    def both(self, body):
        for version in (V3, V5):
            with self.subTest(version="3.1.1" if version == V3 else "5.0"):
                body(version)


class PublishSubscribe(unittest.TestCase, Both):
    def test_qos_levels_both_ways(self):
        def body(v):
            sub, pub = Client(v), Client(v)
            topic = uid("q")
            sub.subscribe(topic, 2)
            for qos in (0, 1, 2):
                pub.publish(topic, f"m{qos}".encode(), qos)
                m = sub.get()
                self.assertEqual((m.payload, m.qos), (f"m{qos}".encode(), qos))
            sub.close(), pub.close()
        self.both(body)

    def test_granted_qos_downgrades_delivery(self):
        def body(v):
            sub, pub = Client(v), Client(v)
            topic = uid("g")
            self.assertEqual(sub.subscribe(topic, 1), [1])
            pub.publish(topic, b"x", 2)
            self.assertEqual(sub.get().qos, 1)
            sub.close(), pub.close()
        self.both(body)

    def test_wildcards_and_dollar_topics(self):
        def body(v):
            base = uid("w")
            sub, pub = Client(v), Client(v)
            sub.subscribe(f"{base}/+/temp", 0)
            sub.subscribe(f"{base}/b/#", 0)
            hash_sub = Client(v)
            hash_sub.subscribe("#", 0)
            pub.publish(f"{base}/a/temp", b"1", 1)
            pub.publish(f"{base}/b/x/y", b"2", 1)
            pub.publish(f"{base}/a/other", b"3", 1)
            got = sorted(sub.get().payload for _ in range(2))
            self.assertEqual(got, [b"1", b"2"])
            sub.nothing()
            pub.publish(f"$SYS/{base}", b"sys", 1)
            seen = []
            try:
                while True:
                    seen.append(hash_sub.get(timeout=0.5).topic)
            except queue.Empty:
                pass
            self.assertNotIn(f"$SYS/{base}", seen)
            for c in (sub, pub, hash_sub):
                c.close()
        self.both(body)

    def test_overlapping_subscriptions_deliver_once_at_highest_qos(self):
        def body(v):
            base = uid("o")
            sub, pub = Client(v), Client(v)
            sub.subscribe(f"{base}/#", 0)
            sub.subscribe(f"{base}/+", 1)
            pub.publish(f"{base}/x", b"once", 1)
            m = sub.get()
            self.assertEqual((m.payload, m.qos), (b"once", 1))
            sub.nothing()
            sub.close(), pub.close()
        self.both(body)


class Retained(unittest.TestCase, Both):
    def test_store_replace_clear(self):
        def body(v):
            topic = uid("r")
            pub = Client(v)
            pub.publish(topic, b"first", 1, retain=True)
            pub.publish(topic, b"second", 1, retain=True)
            sub = Client(v)
            sub.subscribe(topic, 1)
            m = sub.get()
            self.assertEqual((m.payload, m.retain), (b"second", True))
            pub.publish(topic, b"live", 1)
            live = sub.get()
            self.assertEqual((live.payload, live.retain), (b"live", False))
            pub.publish(topic, b"", 1, retain=True)
            late = Client(v)
            late.subscribe(topic, 1)
            late.nothing()
            for c in (pub, sub, late):
                c.close()
        self.both(body)


class Wills(unittest.TestCase, Both):
    def test_will_on_abnormal_close_not_on_disconnect(self):
        def body(v):
            topic = uid("will")
            watcher = Client(v)
            watcher.subscribe(topic, 1)
            polite = Client(v, will=dict(topic=topic, payload=b"polite", qos=1))
            polite.close()
            watcher.nothing(0.7)
            rude = Client(v, will=dict(topic=topic, payload=b"gone", qos=1))
            rude.drop()
            self.assertEqual(watcher.get().payload, b"gone")
            watcher.close()
        self.both(body)

    def test_will_delay_is_cancelled_by_reconnect(self):
        topic = uid("delay")
        watcher = Client(V5)
        watcher.subscribe(topic, 1)
        wp = Properties(PacketTypes.WILLMESSAGE)
        wp.WillDelayInterval = 2
        cp = Properties(PacketTypes.CONNECT)
        cp.SessionExpiryInterval = 30
        cid = uid("delayed")
        c = Client(V5, client_id=cid, will=dict(topic=topic, payload=b"late", qos=1, properties=wp), props=cp)
        c.drop()
        back = Client(V5, client_id=cid, clean=False, will=dict(topic=topic, payload=b"late", qos=1, properties=wp), props=cp)
        watcher.nothing(2.8)
        back.drop()
        m = watcher.get(timeout=4)
        self.assertEqual(m.payload, b"late")
        watcher.close()


class Sessions(unittest.TestCase, Both):
    def test_offline_queue_and_session_present(self):
        def body(v):
            cid, topic = uid("persist"), uid("p")
            props = None
            if v == V5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 60
            s = Client(v, client_id=cid, clean=False, props=props)
            s.subscribe(topic, 1)
            s.close()
            pub = Client(v)
            for i in range(5):
                pub.publish(topic, f"{i}".encode(), 1)
            pub.publish(topic, b"qos0-not-queued", 0)
            pub.publish(topic, b"end", 1)
            back = Client(v, client_id=cid, clean=False, props=props)
            self.assertTrue(back.flags.session_present)
            got = [back.get().payload for _ in range(6)]
            self.assertEqual(got, [f"{i}".encode() for i in range(5)] + [b"end"])
            back.nothing()
            back.close()
            fresh = Client(v, client_id=cid, clean=True)
            self.assertFalse(fresh.flags.session_present)
            fresh.close(), pub.close()
        self.both(body)

    def test_takeover(self):
        def body(v):
            cid = uid("dup")
            first = Client(v, client_id=cid)
            second = Client(v, client_id=cid)
            rc = first.disconnects.get(timeout=WAIT)
            if v == V5:
                self.assertEqual(rc.value, 0x8E)
            topic = uid("after")
            second.subscribe(topic, 1)
            second.publish(topic, b"still works", 1)
            self.assertEqual(second.get().payload, b"still works")
            first.c.loop_stop()
            second.close()
        self.both(body)

    def test_empty_client_id(self):
        c = Client(V3, client_id="", clean=True)
        self.assertEqual(c.rc.value, 0)
        c.close()
        c5 = Client(V5, client_id="")
        self.assertTrue(c5.props.AssignedClientIdentifier.startswith("rampart-"))
        c5.close()
        raw = socket.create_connection(addr("RAMPART_TCP"), timeout=WAIT)
        raw.sendall(bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 0x00, 0, 30, 0, 0]))
        self.assertEqual(raw.recv(4), bytes([0x20, 2, 0, 2]))
        raw.close()

    def test_keepalive_enforced(self):
        raw = socket.create_connection(addr("RAMPART_TCP"), timeout=WAIT)
        cid = b"silent"
        raw.sendall(bytes([0x10, 12 + len(cid), 0, 4]) + b"MQTT" + bytes([4, 0x02, 0, 1, 0, len(cid)]) + cid)
        self.assertEqual(raw.recv(4)[:2], bytes([0x20, 2]))
        start = time.monotonic()
        self.assertEqual(raw.recv(16), b"")
        elapsed = time.monotonic() - start
        self.assertGreater(elapsed, 1.2)
        self.assertLess(elapsed, 3.5)
        raw.close()

    def test_session_expiry_on_disconnect(self):
        cid, topic = uid("exp"), uid("e")
        cp = Properties(PacketTypes.CONNECT)
        cp.SessionExpiryInterval = 60
        s = Client(V5, client_id=cid, clean=False, props=cp)
        s.subscribe(topic, 1)
        dp = Properties(PacketTypes.DISCONNECT)
        dp.SessionExpiryInterval = 0
        s.c.disconnect(properties=dp)
        s.c.loop_stop()
        time.sleep(0.3)
        back = Client(V5, client_id=cid, clean=False, props=cp)
        self.assertFalse(back.flags.session_present)
        back.close()


class Mqtt5(unittest.TestCase):
    def test_properties_pass_through(self):
        topic = uid("props")
        sub, pub = Client(V5), Client(V5)
        sub.subscribe(topic, 1)
        p = Properties(PacketTypes.PUBLISH)
        p.UserProperty = [("site", "plant-7"), ("line", "3")]
        p.ResponseTopic = "reply/here"
        p.CorrelationData = b"\x01\x02"
        p.ContentType = "application/json"
        p.MessageExpiryInterval = 120
        pub.publish(topic, b"{}", 1, props=p)
        m = sub.get()
        self.assertEqual(m.properties.UserProperty, [("site", "plant-7"), ("line", "3")])
        self.assertEqual(m.properties.ResponseTopic, "reply/here")
        self.assertEqual(m.properties.CorrelationData, b"\x01\x02")
        self.assertEqual(m.properties.ContentType, "application/json")
        self.assertTrue(0 < m.properties.MessageExpiryInterval <= 120)
        sub.close(), pub.close()

    def test_expired_messages_are_not_delivered(self):
        cid, topic = uid("late"), uid("x")
        cp = Properties(PacketTypes.CONNECT)
        cp.SessionExpiryInterval = 60
        s = Client(V5, client_id=cid, clean=False, props=cp)
        s.subscribe(topic, 1)
        s.close()
        pub = Client(V5)
        p = Properties(PacketTypes.PUBLISH)
        p.MessageExpiryInterval = 1
        pub.publish(topic, b"short-lived", 1, props=p)
        pub.publish(topic, b"durable", 1)
        time.sleep(1.5)
        back = Client(V5, client_id=cid, clean=False, props=cp)
        self.assertEqual(back.get().payload, b"durable")
        back.nothing()
        back.close(), pub.close()

    def test_topic_alias_from_client(self):
        topic = uid("alias")
        sub = Client(V5)
        sub.subscribe(topic, 1)
        pub = Client(V5)
        p = Properties(PacketTypes.PUBLISH)
        p.TopicAlias = 3
        pub.publish(topic, b"1", 1, props=p)
        pub.publish("", b"2", 1, props=p)
        self.assertEqual([sub.get().payload, sub.get().payload], [b"1", b"2"])
        sub.close(), pub.close()

    def test_client_maximum_packet_size(self):
        topic = uid("max")
        cp = Properties(PacketTypes.CONNECT)
        cp.MaximumPacketSize = 64
        small = Client(V5, props=cp)
        small.subscribe(topic, 1)
        pub = Client(V5)
        pub.publish(topic, b"x" * 200, 1)
        pub.publish(topic, b"fits", 1)
        self.assertEqual(small.get().payload, b"fits")
        small.close(), pub.close()

    def test_subscription_identifiers_no_local_retain_as_published(self):
        topic = uid("opts")
        c = Client(V5)
        sp = Properties(PacketTypes.SUBSCRIBE)
        sp.SubscriptionIdentifier = 42
        c.subscribe(topic, options=SubscribeOptions(qos=1, noLocal=True), properties=sp)
        c.publish(topic, b"mine", 1)
        c.nothing()
        other = Client(V5)
        other.publish(topic, b"theirs", 1, retain=True)
        m = c.get()
        self.assertEqual(m.payload, b"theirs")
        self.assertEqual(m.properties.SubscriptionIdentifier, [42])
        self.assertFalse(m.retain)
        rap = Client(V5)
        rap.subscribe(topic, options=SubscribeOptions(qos=1, retainAsPublished=True, retainHandling=2))
        rap.nothing()
        other.publish(topic, b"flagged", 1, retain=True)
        self.assertTrue(rap.get().retain)
        other.publish(topic, b"", 1, retain=True)
        for x in (c, other, rap):
            x.close()

    def test_retain_handling(self):
        topic = uid("rh")
        pub = Client(V5)
        pub.publish(topic, b"kept", 1, retain=True)
        c = Client(V5)
        c.subscribe(topic, options=SubscribeOptions(qos=1, retainHandling=1))
        self.assertEqual(c.get().payload, b"kept")
        c.subscribe(topic, options=SubscribeOptions(qos=1, retainHandling=1))
        c.nothing()
        c.subscribe(topic, options=SubscribeOptions(qos=1, retainHandling=0))
        self.assertEqual(c.get().payload, b"kept")
        pub.publish(topic, b"", 1, retain=True)
        c.close(), pub.close()

    def test_server_keep_alive_and_limits_in_connack(self):
        c = Client(V5, keepalive=65000)
        self.assertEqual(c.props.ServerKeepAlive, 3600)
        self.assertEqual(c.props.ReceiveMaximum, 100)
        self.assertEqual(c.props.TopicAliasMaximum, 64)
        self.assertEqual(c.props.SharedSubscriptionAvailable, 1)
        c.close()


class SharedSubscriptions(unittest.TestCase, Both):
    def test_round_robin(self):
        def body(v):
            topic, group = uid("job"), uid("g")
            workers = [Client(v) for _ in range(2)]
            for w in workers:
                w.subscribe(f"$share/{group}/{topic}/+", 1)
            pub = Client(v)
            for i in range(6):
                pub.publish(f"{topic}/{i}", f"{i}".encode(), 1)
            counts = []
            for w in workers:
                n = 0
                try:
                    while True:
                        w.get(timeout=0.7)
                        n += 1
                except queue.Empty:
                    pass
                counts.append(n)
            self.assertEqual(sorted(counts), [3, 3])
            for c in workers + [pub]:
                c.close()
        self.both(body)


class Transports(unittest.TestCase, Both):
    def round_trip(self, v, **kw):
        sub, pub = Client(v, **kw), Client(v, **kw)
        topic = uid("tr")
        sub.subscribe(topic, 1)
        pub.publish(topic, b"over the wire", 1)
        self.assertEqual(sub.get().payload, b"over the wire")
        sub.close(), pub.close()

    def test_websocket(self):
        self.both(lambda v: self.round_trip(v, transport="websockets", endpoint="RAMPART_WS"))

    def test_tls(self):
        self.both(lambda v: self.round_trip(v, endpoint="RAMPART_TLS", tls=True))

    def test_secure_websocket(self):
        self.both(lambda v: self.round_trip(v, transport="websockets", endpoint="RAMPART_WSS", tls=True))


if __name__ == "__main__":
    unittest.main()
