"""SCRAM-SHA-256/512 over MQTT 5 enhanced authentication, driven by independent implementations:
paho-mqtt builds and parses the MQTT packets (CONNECT/CONNACK properties, AUTH), scramp does SCRAM
(RFC 5802/7677) and verifies the server's signature. paho-mqtt 2.x does not handle incoming AUTH
packets, so ScramClient adds that one handler; everything else is paho's.

Run by tests/scram.rs against a broker whose state has user RAMPART_SCRAM_USER with password
RAMPART_SCRAM_PASSWORD (both mechanisms) and rules allowing it to publish to scram/<user>/#.
"""

import os
import struct
import threading
import unittest
import warnings

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from scramp import ScramClient as Scram

HOST, PORT = os.environ["RAMPART_TCP"].rsplit(":", 1)
USER = os.environ["RAMPART_SCRAM_USER"]
PASSWORD = os.environ["RAMPART_SCRAM_PASSWORD"]

SUCCESS, CONTINUE, REAUTHENTICATE = 0x00, 0x18, 0x19


class ScramClient(mqtt.Client):
    """A paho client that answers AUTH packets with a scramp client."""

    def __init__(self, method, password, replay_final=None):
        super().__init__(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{USER}-{method}-{os.getpid()}", protocol=mqtt.MQTTv5)
        self.method = method
        self.password = password
        self.replay_final = replay_final
        self.scram = None
        self.sent_final = None
        self.connack = None
        self.auth_success = None
        self.done = threading.Event()
        self.on_connect = self.connack_received
        self.on_disconnect = lambda *a: self.done.set()

    def start_scram(self):
        # An unsupported method still sends SCRAM-SHA-256 data: the broker refuses the method.
        mechanism = self.method if self.method in ("SCRAM-SHA-256", "SCRAM-SHA-512") else "SCRAM-SHA-256"
        self.scram = Scram([mechanism], USER, self.password)
        return self.scram.get_client_first().encode()

    def connect_scram(self):
        props = Properties(PacketTypes.CONNECT)
        props.AuthenticationMethod = self.method
        props.AuthenticationData = self.start_scram()
        self.connect(HOST, int(PORT), keepalive=30, properties=props)

    def connack_received(self, client, userdata, flags, reason_code, properties):
        data = getattr(properties, "AuthenticationData", None)
        self.connack = (reason_code.value, data)
        if reason_code.value == 0:
            # Raises if the server's signature does not prove it knows the verifier.
            self.scram.set_server_final(data.decode())
        self.done.set()

    def reauthenticate(self):
        self.done.clear()
        self._send_auth(REAUTHENTICATE, self.start_scram())

    def _send_auth(self, reason, data):
        props = Properties(PacketTypes.AUTH)
        props.AuthenticationMethod = self.method
        props.AuthenticationData = data
        packed = props.pack()
        packet = bytearray(struct.pack("!B", mqtt.AUTH))
        self._pack_remaining_length(packet, 1 + len(packed))
        packet += struct.pack("!B", reason) + packed
        return self._packet_queue(mqtt.AUTH, packet, 0, 0)

    def _packet_handle(self):
        if self._in_packet["command"] & 0xF0 != mqtt.AUTH:
            return super()._packet_handle()
        body = self._in_packet["packet"]
        reason = body[0] if body else SUCCESS
        props = Properties(PacketTypes.AUTH)
        if len(body) > 1:
            props.unpack(body[1:])
        data = props.AuthenticationData
        if reason == CONTINUE:
            self.scram.set_server_first(data.decode())
            final = self.replay_final or self.scram.get_client_final().encode()
            self.sent_final = final
            return self._send_auth(CONTINUE, final)
        if reason == SUCCESS:
            self.scram.set_server_final(data.decode())
            self.auth_success = True
            self.done.set()
        return mqtt.MQTT_ERR_SUCCESS


def run(client, action):
    action()
    client.loop_start()
    try:
        assert client.done.wait(10), "no answer from the broker"
    finally:
        client.loop_stop()


class ScramSuite(unittest.TestCase):
    def setUp(self):
        # paho leaves its wake-up socket pair to the garbage collector.
        warnings.simplefilter("ignore", ResourceWarning)

    def connect(self, method, password=PASSWORD, replay_final=None):
        client = ScramClient(method, password, replay_final)
        run(client, client.connect_scram)
        return client

    def test_both_mechanisms_connect_and_the_server_proves_itself(self):
        for method in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
            with self.subTest(method=method):
                client = self.connect(method)
                self.assertEqual(client.connack[0], 0, client.connack)
                info = client.publish(f"scram/{USER}/t", b"x", qos=1)
                client.loop_start()
                info.wait_for_publish(10)
                client.loop_stop()
                self.assertTrue(info.is_published())
                client.disconnect()

    def test_reauthentication_during_the_session(self):
        client = self.connect("SCRAM-SHA-256")
        self.assertEqual(client.connack[0], 0)
        run(client, client.reauthenticate)
        self.assertTrue(client.auth_success, "AUTH success with a verified server signature")
        client.disconnect()

    def test_a_wrong_password_is_refused_with_0x86(self):
        client = self.connect("SCRAM-SHA-256", password="wrong-password")
        self.assertEqual(client.connack[0], 0x86, client.connack)

    def test_a_replayed_final_message_is_refused(self):
        first = self.connect("SCRAM-SHA-256")
        self.assertEqual(first.connack[0], 0)
        first.disconnect()
        replay = self.connect("SCRAM-SHA-256", replay_final=first.sent_final)
        self.assertEqual(replay.connack[0], 0x86, replay.connack)

    def test_an_unknown_method_is_refused_with_0x8c(self):
        client = self.connect("SCRAM-SHA-1")
        self.assertEqual(client.connack[0], 0x8C, client.connack)


if __name__ == "__main__":
    unittest.main()
