# How fuzz/corpus/ was made (one-off; run from anywhere, paths are relative to this
# repository). /tmp/seeds/webrtc/ comes from webrtc_seeds.rs (a throwaway crate: stun 0.17 +
# turn 0.17); without it those seeds are left out.
import re, os, glob, struct, shutil
repo = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
root = os.path.join(repo, 'fuzz', 'corpus')
shared = os.path.join(repo, 'tests', 'corpus')
src = open(os.path.join(repo, 'src', 'proto', 'tests.rs')).read()
rfc = {}
for name, body in re.findall(r'const (RFC5769_\w+): \[u8; \d+\] = \[(.*?)\];', src, re.S):
    rfc[name.lower().replace('_', '-')] = bytes(int(x, 16) for x in re.findall(r'0x[0-9a-fA-F]{2}', body))
assert len(rfc) == 4, rfc.keys()
msgs = {}  # name -> bytes
for n, b in rfc.items():
    msgs['seed-' + n] = b
for p in sorted(glob.glob(shared + '/*/*.bin')):
    folder = os.path.basename(os.path.dirname(p))
    msgs['seed-' + folder + '-' + os.path.basename(p)[:-4]] = open(p, 'rb').read()
for p in sorted(glob.glob('/tmp/seeds/webrtc/*.bin')):
    msgs['seed-' + os.path.basename(p)[:-4]] = open(p, 'rb').read()

def put(target, name, data):
    d = os.path.join(root, target)
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, name), 'wb').write(data)

for t in ['stun_message', 'differential', 'channel_data']:
    shutil.rmtree(os.path.join(root, t), ignore_errors=True)
for n, b in msgs.items():
    stunlike = b and b[0] < 0x40
    put('stun_message', n, b)
    if stunlike:
        put('differential', n, b)
    if not stunlike or 'channeldata' in n:
        put('channel_data', n, b)
put('channel_data', 'seed-min', bytes([0x40, 0, 0, 0]))
put('channel_data', 'seed-trunc', bytes([0x7f, 0xff, 0, 8, 1, 2]))

# stream_framing: selector byte, then the frames of each folder back to back (TCP files
# already carry their padding; UDP ChannelData gets padded to 4 as on a stream).
shutil.rmtree(os.path.join(root, 'stream_framing'), ignore_errors=True)
folders = {}
for n, b in msgs.items():
    key = n.rsplit('-', 3)[0] if False else n.split('-')[1] + '-' + n.split('-')[2]
    folders.setdefault(key, []).append(b)
for i, (k, frames) in enumerate(sorted(folders.items())):
    s = b''
    for b in frames[:12]:
        if b and 0x40 <= b[0] <= 0x7f and len(b) % 4:
            b = b + bytes(4 - len(b) % 4)
        s += b
    put('stream_framing', 'seed-' + k, bytes([3]) + s)
    put('stream_framing', 'seed-' + k + '-small-max', bytes([1]) + s[:3000])
put('stream_framing', 'seed-partial', bytes([3]) + rfc['rfc5769-request'][:50])

# config
shutil.rmtree(os.path.join(root, 'config'), ignore_errors=True)
put('config', 'seed-conf-turnstone.toml', open(os.path.join(repo, 'conf', 'turnstone.toml'), 'rb').read())
put('config', 'seed-minimal.toml', b'[server]\nrealm = "example.org"\n[auth]\nsecrets = ["x"]\n')
put('config', 'seed-full.toml', b'''[server]
realm = "turn.example.com"
software = ""
nonce_lifetime = "10m"
workers = 2
[[listen]]
transport = "udp"
address = "0.0.0.0:3478"
[[listen]]
transport = "tcp"
address = "[::]:3478"
[relay]
address = ["192.0.2.1", "2001:db8::1"]
external_address = "198.51.100.1"
ports = "49152-65535"
[auth]
users = { alice = "wonderland" }
secrets = ["a", "b"]
[policy]
allow_peers = ["10.0.0.0/8"]
deny_peers = ["10.1.0.0/16", "::ffff:0:0/96"]
[limits]
max_allocations = 10
max_allocations_per_user = 2
max_permissions_per_allocation = 8
max_channels_per_allocation = 8
max_lifetime = "1h"
default_lifetime = "10m"
[log]
level = "debug"
format = "json"
''')
put('config', 'seed-bad.toml', b'[server]\nrealm = 5\nbogus = true\n[relay]\nports = "9-1"\n')

# credentials: now (4 bytes) + flag + kind + rest
shutil.rmtree(os.path.join(root, 'credentials'), ignore_errors=True)
now = struct.pack('>I', 200_000_000) + b'\x01'
put('credentials', 'seed-static', now + b'\x00alice')
put('credentials', 'seed-rest-valid', now + b'\x01\x10carol')
put('credentials', 'seed-rest-expired', now + b'\x01\xf0carol')
put('credentials', 'seed-rest-text', now + b'\x001800000000:dave')
put('credentials', 'seed-overflow', now + b'\x0099999999999999999999999:x')
put('credentials', 'seed-nonce', now + b'\x00' + b'0bebc2000123456789abcdef' + b'\x00\x10')
put('credentials', 'seed-named', now + b'\x02\x02')

# server_sequence: setup (2 bytes) + ops; see Op::decode in fuzz/src/checks.rs.
shutil.rmtree(os.path.join(root, 'server_sequence'), ignore_errors=True)
G = 0xC0  # good credentials (alice, valid nonce, SHA-1, no FINGERPRINT)
alloc = lambda c, flags=0: bytes([0, c, G, flags])
perm = lambda c, peer=0: bytes([3, c, G, 0, peer])
bind = lambda c, num=0, peer=0: bytes([5, c, G, num, peer])
send = lambda c, peer=0, n=10: bytes([8, c, peer, n, 0])
chan = lambda c, num=0, n=10: bytes([10, c, num, n, 0])
peerd = lambda relay=0, frm=0, n=5: bytes([12, relay, frm, n])
tick = lambda x: bytes([13, 0, x])
refresh = lambda c, l=1: bytes([2, c, G, l])
setup = bytes([0x00, 0x00])
flows = {
    'basic': setup + alloc(0) + perm(0) + send(0) + bind(0) + chan(0) + peerd() + refresh(0, 1),
    'two-clients-relay': setup + alloc(0) + alloc(1) + perm(0, 4) + bind(1, 0, 4) + chan(1) + peerd(1, 4) + refresh(0, 1) + chan(1) + send(1, 4),
    'v6-and-tcp': setup + alloc(2, 0x04) + alloc(3) + perm(2, 7*8) + perm(3) + bind(3) + peerd(0, 0) + peerd(1, 0) + chan(3),
    'expiry': setup + alloc(0) + perm(0) + bind(0) + tick(5*8+0) + tick(6) + tick(5) + chan(0) + tick(7) + bytes([0xff, 0xff]),
    'even-port-token': setup + alloc(0, 0x20) + alloc(1, 0x40) + tick(4) + tick(4) + alloc(1, 0x40),
    'quota': bytes([0x00, 0x00]) + alloc(0) + alloc(1) + alloc(2) + alloc(3) + refresh(1) + alloc(1),
    #'default-policy-relay': bytes([0x29, 0x00]) + alloc(0) + alloc(1) + perm(0, 12) + bind(0, 0, 12) + refresh(1) + chan(0) + send(0, 4),
    'bad-creds': setup + bytes([0, 0, 0x04, 0]) + bytes([0, 0, 0x0B, 0]) + bytes([0, 0, 0x1A, 0]) + alloc(0) + bytes([7, 0, G, 2, 3, 0, 8]) + bytes([15, 0, 8]) + b'\x00\x01\x00\x00!\x12\xa4B',
}
for k, v in flows.items():
    put('server_sequence', 'seed-' + k, v)
print({t: len(os.listdir(os.path.join(root, t))) for t in os.listdir(root)})
