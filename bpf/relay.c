/* turnstone's XDP fast path: ChannelData and Send/Data indications <-> UDP for entries userspace installed (client to client through two of our relays too), out of the interface the routing table chooses; everything else goes up unchanged (XDP_PASS). See bpf/README.md. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

#define MAX_ENTRIES 65536
/* perm_val.flags: the peer policy denies this IP; userspace must check each packet. */
#define PERM_RELAYS_ONLY 1

#define STUN_COOKIE 0x2112a442
#define ATTR_XOR_PEER_ADDRESS 0x0012
#define ATTR_DATA 0x0013

/* Addresses are 16 bytes in network order: IPv6 as is, IPv4 as ::ffff:a.b.c.d.
 * Ports and channel numbers are in network order. Padding fields must be zero. */

/* chan_by_client: ChannelData from client on server with number -> UDP relay -> peer. */
struct chan_client_key {
	__u32 client[4];
	__u32 server[4];
	__be16 client_port;
	__be16 server_port;
	__be16 number;
	__u16 pad;
};
struct chan_client_val {
	__u32 relay[4];
	__u32 peer[4];
	__be16 relay_port;
	__be16 peer_port;
	__u32 entry; /* index into counters */
};

/* chan_by_relay: UDP from peer to relay -> ChannelData with number from server to client. */
struct chan_relay_key {
	__u32 relay[4];
	__u32 peer[4];
	__be16 relay_port;
	__be16 peer_port;
};
struct chan_relay_val {
	__u32 client[4];
	__u32 server[4];
	__be16 client_port;
	__be16 server_port;
	__be16 number;
	__u16 pad;
	__u32 entry;
};

/* perm_by_relay: the permission of peer IP on relay; both directions need it. */
struct perm_relay_key {
	__u32 relay[4];
	__u32 peer[4];
	__be16 relay_port;
	__u16 pad;
};
struct perm_val {
	__u32 client[4];
	__u32 server[4];
	__be16 client_port;
	__be16 server_port;
	__u32 entry;
	__u32 flags;
};

/* perm_by_client: Send indications from client on server to the peer's IP -> UDP from relay. */
struct perm_client_key {
	__u32 client[4];
	__u32 server[4];
	__u32 peer[4];
	__be16 client_port;
	__be16 server_port;
};
struct perm_client_val {
	__u32 relay[4];
	__be16 relay_port;
	__u16 pad;
	__u32 entry;
	__u32 flags;
};

struct counter {
	__u64 packets;
	__u64 bytes; /* application data bytes relayed */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ENTRIES);
	__type(key, struct chan_client_key);
	__type(value, struct chan_client_val);
} chan_by_client SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ENTRIES);
	__type(key, struct chan_relay_key);
	__type(value, struct chan_relay_val);
} chan_by_relay SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ENTRIES);
	__type(key, struct perm_relay_key);
	__type(value, struct perm_val);
} perm_by_relay SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ENTRIES);
	__type(key, struct perm_client_key);
	__type(value, struct perm_client_val);
} perm_by_client SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_ENTRIES);
	__type(key, __u32);
	__type(value, struct counter);
} counters SEC(".maps");

/* A parsed Ethernet / IPv4 (no options, not a fragment) or IPv6 (no extension
 * headers) / UDP frame whose lengths all agree with the frame's. */
struct pkt {
	__u32 src[4];
	__u32 dst[4];
	__be16 sport;
	__be16 dport;
	__u16 udp_len; /* host order */
	__u16 csum;    /* as in the packet */
	int v6;
};

/* A path found nothing to do (and changed nothing): the next path, or XDP_PASS. */
#define NOT_MINE -1
/* A client path found the peer may be a relay of ours and filled the scratch plan's input:
 * client_to_client's (called from the top, for the stack's sake). */
#define TO_CLIENT -2

#define ETH_LEN 14
#define IP4_LEN 20
#define IP6_LEN 40
#define UDP_LEN 8

static __always_inline void map4(__u32 *a, __u32 addr)
{
	a[0] = 0;
	a[1] = 0;
	a[2] = bpf_htonl(0xffff);
	a[3] = addr;
}

static __always_inline int is_mapped4(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

static __always_inline __u32 fold(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return s;
}

/* Ones' complement sum of an address's 16-bit words (in memory order). */
static __always_inline __u32 sum_addr(const __u32 *a, int v6)
{
	__u32 s = 0;
	int i;
#pragma unroll
	for (i = 0; i < 4; i++) {
		if (v6 || i == 3) {
			s += a[i] >> 16;
			s += a[i] & 0xffff;
		}
	}
	return s;
}

/* -x in ones' complement, for a 16-bit word or a folded sum. */
static __always_inline __u32 neg(__u32 x)
{
	return ~fold(x) & 0xffff;
}

/* The ones' complement of the sum of `pad` (at most 3) bytes at frame offset `off`, the
 * first of which is at an even UDP offset when `odd` is 0. */
static __always_inline int neg_padding(struct xdp_md *ctx, __u32 off, __u32 odd, __u16 pad,
				       __u32 *out)
{
	__u8 b[4] = {};
	__u32 s = 0;
	int i;

	if (pad == 0)
		return 0;
	if (pad > 3 || bpf_xdp_load_bytes(ctx, off, b, pad))
		return -1;
#pragma unroll
	for (i = 0; i < 3; i++) {
		__u32 w = ((odd + i) & 1) ? bpf_htons(b[i]) : bpf_htons((__u16)b[i] << 8);

		s += neg(w); /* zero past pad: removes nothing */
	}
	*out += s;
	return 0;
}

/* Reading a datagram in chunks to sum it (checksum_complete): one buffer per CPU. */
#define CSUM_CHUNK 256
#define CSUM_CHUNKS 6
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u8[CSUM_CHUNK]);
} csum_buf SEC(".maps");

/* 1 if the UDP datagram of `len` bytes at frame offset `off`, with the pseudo-header's
 * sum `ph`, carries a complete, right checksum (everything it covers sums to 0xffff); 0
 * otherwise, and for datagrams of CSUM_CHUNKS * CSUM_CHUNK bytes or more. Only called for a
 * checksum field that looks like CHECKSUM_PARTIAL's (1 in 65536 of wire datagrams). */
static __noinline int checksum_complete(struct xdp_md *ctx, __u32 off, __u32 len, __u32 ph)
{
	__u32 zero = 0;
	__u8 *buf = bpf_map_lookup_elem(&csum_buf, &zero);
	__u64 s = ph;
	__u32 done = 0, tail, whole;
	int i;

	/* At most CSUM_CHUNKS - 1 whole chunks and a tail shorter than one. */
	if (!buf || len >= CSUM_CHUNK * CSUM_CHUNKS)
		return 0;
	/* Whole chunks first (constant sizes), then the tail's whole 32-bit words, then its
	 * last 1 to 3 bytes zero-padded on the stack: no variable offset into a map value and
	 * few branches, as the verifier wants of a loader without CAP_PERFMON. */
	for (i = 0; i < CSUM_CHUNKS - 1; i++) {
		__s64 c;

		if (done + CSUM_CHUNK > len)
			break;
		if (bpf_xdp_load_bytes(ctx, off + done, buf, CSUM_CHUNK))
			return 0;
		c = bpf_csum_diff(0, 0, (__be32 *)buf, CSUM_CHUNK, 0);
		if (c < 0)
			return 0;
		s += (__u32)c;
		done += CSUM_CHUNK;
	}
	tail = len - done;
	/* Hidden from the compiler, so the mask below stays for the verifier. */
	barrier_var(tail);
	tail &= CSUM_CHUNK - 1; /* < CSUM_CHUNK: len < CSUM_CHUNKS * CSUM_CHUNK, checked */
	whole = tail & ~3U;
	if (whole) {
		__s64 c;

		if (bpf_xdp_load_bytes(ctx, off + done, buf, whole))
			return 0;
		c = bpf_csum_diff(0, 0, (__be32 *)buf, whole, 0);
		if (c < 0)
			return 0;
		s += (__u32)c;
	}
	if (tail & 3) {
		__u32 t = 0;

		if (bpf_xdp_load_bytes(ctx, off + done + whole, &t, tail & 3))
			return 0;
		s += (t & 0xffff) + (t >> 16);
	}
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffffffff) + (s >> 32);
	return fold((__u32)s) == 0xffff;
}

static __always_inline int parse(struct xdp_md *ctx, struct pkt *p, void **payload)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct udphdr *udp;
	__u32 l3len;

	if ((void *)(eth + 1) > end)
		return -1;
	l3len = bpf_xdp_get_buff_len(ctx) - ETH_LEN;

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		__u16 *w = (void *)ip;
		__u32 s = 0;
		int i;

		if ((void *)(ip + 1) > end)
			return -1;
		if (*(__u8 *)ip != 0x45) /* version 4, no options */
			return -1;
		if (ip->frag_off & bpf_htons(0x3fff)) /* MF or an offset */
			return -1;
		if (ip->protocol != IPPROTO_UDP)
			return -1;
		if (bpf_ntohs(ip->tot_len) != l3len) /* also: no Ethernet padding */
			return -1;
#pragma unroll
		for (i = 0; i < IP4_LEN / 2; i++)
			s += w[i];
		if (fold(s) != 0xffff) /* bad header checksum: the kernel decides */
			return -1;
		p->v6 = 0;
		map4(p->src, ip->saddr);
		map4(p->dst, ip->daddr);
		udp = (void *)(ip + 1);
		l3len -= IP4_LEN;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return -1;
		if (ip6->version != 6 || ip6->nexthdr != IPPROTO_UDP)
			return -1;
		if (bpf_ntohs(ip6->payload_len) != l3len - IP6_LEN)
			return -1;
		p->v6 = 1;
		__builtin_memcpy(p->src, &ip6->saddr, 16);
		__builtin_memcpy(p->dst, &ip6->daddr, 16);
		udp = (void *)(ip6 + 1);
		l3len -= IP6_LEN;
	} else {
		return -1;
	}

	if ((void *)(udp + 1) > end)
		return -1;
	p->udp_len = bpf_ntohs(udp->len);
	if (p->udp_len != l3len || p->udp_len < UDP_LEN)
		return -1;
	p->sport = udp->source;
	p->dport = udp->dest;
	p->csum = udp->check;
	if (p->v6 && p->csum == 0) /* invalid over IPv6 */
		return -1;
	/* CHECKSUM_PARTIAL: a datagram from a process on this host (through a veth) whose
	 * checksum was left to an offload holds only the pseudo-header's sum, folded, not
	 * complemented (Linux: ~csum_tcpudp_magic(), ~csum_ipv6_magic()); the incremental
	 * update would make it wrong. Up: the stack relays it. A complete checksum equals
	 * this by chance 1 in 65536: summing the whole datagram tells them apart, so those
	 * stay here (going up, they could be overtaken by the next ones). */
	{
		__u32 ph = sum_addr(p->src, p->v6) + sum_addr(p->dst, p->v6) +
			   bpf_htons(IPPROTO_UDP) + bpf_htons(p->udp_len);

		if (p->csum && p->csum == fold(ph) &&
		    !checksum_complete(ctx, p->v6 ? ETH_LEN + IP6_LEN : ETH_LEN + IP4_LEN,
				       p->udp_len, ph))
			return -1;
	}
	*payload = udp + 1;
	return 0;
}

static __always_inline int same_family(const __u32 *a, int v6)
{
	return v6 ? !is_mapped4(a) : is_mapped4(a);
}

/* The route of the packet to be written (src -> dst, UDP of udp_len bytes): 0 with *fib
 * holding the output interface and MACs when the lookup succeeds (which includes the
 * route's MTU check: tot_len), otherwise bpf_fib_lookup's code (no route, no neighbour
 * yet, blackhole, fragmentation needed, forwarding disabled on the ingress interface...;
 * BPF_FIB_LKUP_RET_NOT_FWDED for a local destination). Changes no packet byte: a caller
 * that gets non-zero passes the frame up untouched. */
static __always_inline int route(struct xdp_md *ctx, struct bpf_fib_lookup *fib, int v6,
				 const __u32 *src, const __u32 *dst, __be16 sport, __be16 dport,
				 __u16 udp_len)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->l4_protocol = IPPROTO_UDP;
	fib->sport = sport;
	fib->dport = dport;
	fib->ifindex = ctx->ingress_ifindex;
	if (v6) {
		fib->family = AF_INET6;
		fib->tot_len = udp_len + IP6_LEN;
		__builtin_memcpy(fib->ipv6_src, src, 16);
		__builtin_memcpy(fib->ipv6_dst, dst, 16);
	} else {
		fib->family = AF_INET;
		fib->tot_len = udp_len + IP4_LEN;
		fib->ipv4_src = src[3];
		fib->ipv4_dst = dst[3];
	}
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
}

/* The action for a rewritten frame: back out of the ingress interface, or to another. */
static __always_inline int forward(struct xdp_md *ctx, const struct bpf_fib_lookup *fib)
{
	if (fib->ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(fib->ifindex, 0);
}

/* Writes fresh Ethernet (the route's MACs) / IP / UDP headers at the frame's start. */
static __always_inline int write_headers(struct xdp_md *ctx, const struct pkt *p,
					 const struct bpf_fib_lookup *fib, const __u32 *src,
					 const __u32 *dst, __be16 sport, __be16 dport,
					 __u16 udp_len, __u16 csum, int df)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct udphdr *udp;

	if ((void *)(eth + 1) > end)
		return -1;
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	if (!p->v6) {
		struct iphdr *ip = (void *)(eth + 1);
		__u16 *w = (void *)ip;
		__u32 s = 0;
		int i;

		if ((void *)(ip + 1) > end)
			return -1;
		eth->h_proto = bpf_htons(ETH_P_IP);
		*(__u8 *)ip = 0x45;
		ip->tos = 0;
		ip->tot_len = bpf_htons(udp_len + IP4_LEN);
		ip->id = 0;
		ip->frag_off = df ? bpf_htons(0x4000) : 0;
		ip->ttl = 64;
		ip->protocol = IPPROTO_UDP;
		ip->check = 0;
		ip->saddr = src[3];
		ip->daddr = dst[3];
#pragma unroll
		for (i = 0; i < IP4_LEN / 2; i++)
			s += w[i];
		ip->check = ~fold(s) & 0xffff;
		udp = (void *)(ip + 1);
	} else {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return -1;
		eth->h_proto = bpf_htons(ETH_P_IPV6);
		*(__be32 *)ip6 = bpf_htonl(0x60000000); /* version 6, class 0, flow 0 */
		ip6->payload_len = bpf_htons(udp_len);
		ip6->nexthdr = IPPROTO_UDP;
		ip6->hop_limit = 64;
		__builtin_memcpy(&ip6->saddr, src, 16);
		__builtin_memcpy(&ip6->daddr, dst, 16);
		udp = (void *)(ip6 + 1);
	}
	if ((void *)(udp + 1) > end)
		return -1;
	udp->source = sport;
	udp->dest = dport;
	udp->len = bpf_htons(udp_len);
	udp->check = csum;
	return 0;
}

static __always_inline void count(__u32 entry, __u32 bytes)
{
	struct counter *c = bpf_map_lookup_elem(&counters, &entry);

	if (c) {
		c->packets += 1;
		c->bytes += bytes;
	}
}

/* The permission of `peer` on a relay: 0 none, 1 permitted, 2 relays-only (the peer
 * policy denies the IP: only a live relay of ours may use it, which the program proves
 * only for client to client, where the other allocation's entry exists). */
#define PERM_NONE 0
#define PERM_OK 1
#define PERM_RELAYS 2
static __always_inline int permission(const __u32 *relay, __be16 relay_port, const __u32 *peer)
{
	struct perm_relay_key k = {};
	struct perm_val *v;

	__builtin_memcpy(k.relay, relay, 16);
	__builtin_memcpy(k.peer, peer, 16);
	k.relay_port = relay_port;
	v = bpf_map_lookup_elem(&perm_by_relay, &k);
	if (!v)
		return PERM_NONE;
	return (v->flags & PERM_RELAYS_ONLY) ? PERM_RELAYS : PERM_OK;
}

/* What a client is to receive, planned before any byte changes: the route, addresses,
 * UDP length and checksum, and the message before the data (ChannelData's 4 bytes, or a
 * Data indication's 36/48: header, XOR-PEER-ADDRESS, DATA's header) and zero padding
 * after it. The caller fills the first fields (what arrived). */
struct plan {
	/* In: `dlen` bytes of data from `src` to `relay` (a peer's, or with `c2c` another
	 * relay of ours: a relays-only permission is then satisfied), in a frame whose UDP
	 * payload is `in_hlen` bytes of message, the data and `in_pad` bytes after it (its
	 * padding, and a Send indication's attributes after DATA).
	 * `sum` is the ones' complement sum of what stays of the input's checksummed bytes
	 * (the data, at an even UDP offset, and the pseudo-header's protocol), used when
	 * p->csum is not 0. */
	__u32 relay[4];
	__u32 src[4];
	__be16 relay_port;
	__be16 sport;
	__u32 dlen;
	__u32 sum;
	__u32 c2c;
	__u32 in_hlen;
	__u32 in_pad;
	__u32 from_entry; /* client to client: the sender's entry */
	/* Out. */
	struct bpf_fib_lookup fib;
	__u32 server[4];
	__u32 client[4];
	__be16 server_port;
	__be16 client_port;
	__u16 new_len; /* UDP length, host order */
	__u16 csum;
	__u32 entry;
	__u32 hlen; /* 4, 36 or 48 */
	__u32 pad;  /* zero bytes after the data */
	__u8 hdr[48];
};

/* One plan per CPU: too big for the stack next to the client paths' own variables (an
 * XDP program runs to its end on one CPU). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct plan);
} scratch SEC(".maps");

static __always_inline struct plan *scratch_plan(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&scratch, &zero);
}

/* Plans the frame for the client of t->relay receiving the data from t->src: 0 when
 * planned; NOT_MINE without a channel or permission for t->src; XDP_PASS when userspace
 * must relay it. Changes no packet byte. */
static __noinline int plan_to_client(struct xdp_md *ctx, const struct pkt *p, struct plan *t)
{
	const __u32 *relay = t->relay, *src = t->src;
	__be16 relay_port = t->relay_port, sport = t->sport;
	__u32 dlen = t->dlen, c2c = t->c2c;
	struct chan_relay_key ck = {};
	struct perm_relay_key pk = {};
	struct chan_relay_val *cv;
	struct perm_val *pv;
	__u32 mtu = 0, out_len, i;
	int perm;

	__builtin_memcpy(ck.relay, relay, 16);
	__builtin_memcpy(ck.peer, src, 16);
	ck.relay_port = relay_port;
	ck.peer_port = sport;
	cv = bpf_map_lookup_elem(&chan_by_relay, &ck);
	if (cv) {
		if (!same_family(cv->client, p->v6) || !same_family(cv->server, p->v6))
			return XDP_PASS;
		__builtin_memcpy(t->client, cv->client, 16);
		__builtin_memcpy(t->server, cv->server, 16);
		t->client_port = cv->client_port;
		t->server_port = cv->server_port;
		t->entry = cv->entry;
		*(__be16 *)&t->hdr[0] = cv->number;
		*(__be16 *)&t->hdr[2] = bpf_htons(dlen);
		t->hlen = 4;
		t->pad = 0; /* no padding over UDP */
		perm = permission(relay, relay_port, src);
		if (perm == PERM_NONE || (perm == PERM_RELAYS && !c2c))
			return XDP_PASS;
	} else {
		__builtin_memcpy(pk.relay, relay, 16);
		__builtin_memcpy(pk.peer, src, 16);
		pk.relay_port = relay_port;
		pv = bpf_map_lookup_elem(&perm_by_relay, &pk);
		if (!pv)
			return NOT_MINE;
		if ((pv->flags & PERM_RELAYS_ONLY) && !c2c)
			return XDP_PASS;
		if (!same_family(pv->client, p->v6) || !same_family(pv->server, p->v6))
			return XDP_PASS;
		__builtin_memcpy(t->client, pv->client, 16);
		__builtin_memcpy(t->server, pv->server, 16);
		t->client_port = pv->client_port;
		t->server_port = pv->server_port;
		t->entry = pv->entry;
		/* A Data indication (RFC 8656 section 11.3), as turnstone's userspace writes
		 * it: a fresh random transaction id, XOR-PEER-ADDRESS, DATA padded to 4. */
		t->hlen = p->v6 ? 48 : 36;
		t->pad = (4 - (dlen & 3)) & 3;
		/* Zero past hlen: the checksum adds all 48 (the scratch keeps the last plan). */
		__builtin_memset(t->hdr, 0, sizeof(t->hdr));
		*(__be16 *)&t->hdr[0] = bpf_htons(0x0017);
		*(__be16 *)&t->hdr[2] = bpf_htons(t->hlen - 20 + dlen + t->pad);
		*(__be32 *)&t->hdr[4] = bpf_htonl(STUN_COOKIE);
		*(__u32 *)&t->hdr[8] = bpf_get_prandom_u32();
		*(__u32 *)&t->hdr[12] = bpf_get_prandom_u32();
		*(__u32 *)&t->hdr[16] = bpf_get_prandom_u32();
		*(__be16 *)&t->hdr[20] = bpf_htons(ATTR_XOR_PEER_ADDRESS);
		*(__be16 *)&t->hdr[22] = bpf_htons(p->v6 ? 20 : 8);
		t->hdr[25] = p->v6 ? 2 : 1;
		*(__be16 *)&t->hdr[26] = sport ^ bpf_htons(STUN_COOKIE >> 16);
		if (p->v6) {
			/* XORed with the cookie and the transaction id: hdr[4..20). */
#pragma unroll
			for (i = 0; i < 4; i++)
				*(__u32 *)&t->hdr[28 + 4 * i] = src[i] ^ *(__u32 *)&t->hdr[4 + 4 * i];
			*(__be16 *)&t->hdr[44] = bpf_htons(ATTR_DATA);
			*(__be16 *)&t->hdr[46] = bpf_htons(dlen);
		} else {
			*(__u32 *)&t->hdr[28] = src[3] ^ bpf_htonl(STUN_COOKIE);
			*(__be16 *)&t->hdr[32] = bpf_htons(ATTR_DATA);
			*(__be16 *)&t->hdr[34] = bpf_htons(dlen);
		}
	}

	out_len = dlen + UDP_LEN + t->hlen + t->pad;
	if (out_len + IP4_LEN > 0xffff)
		return XDP_PASS;
	t->new_len = out_len;
	if (route(ctx, &t->fib, p->v6, t->server, t->client, t->server_port, t->client_port,
		  t->new_len))
		return XDP_PASS;
	/* The result against the output interface's MTU (the route's was checked); the
	 * input's lengths all agree (parse). */
	if (bpf_check_mtu(ctx, t->fib.ifindex, &mtu, (__s32)out_len - (__s32)p->udp_len, 0))
		return XDP_PASS;

	t->csum = 0;
	if (p->csum) {
		__u32 s = t->sum;
		__u32 nl = bpf_htons(t->new_len);

		s += sum_addr(t->server, p->v6) + sum_addr(t->client, p->v6);
		s += nl + nl + t->server_port + t->client_port;
		if (t->hlen == 4) {
			s += *(__u16 *)&t->hdr[0] + *(__u16 *)&t->hdr[2];
		} else {
#pragma unroll
			for (i = 0; i < 48; i += 2) /* the message before the data */
				s += *(__u16 *)&t->hdr[i];
		}
		t->csum = ~fold(fold(s)) & 0xffff;
		if (t->csum == 0)
			t->csum = 0xffff;
	}
	return 0;
}

/* Turns the frame into the planned one. 0 when done (the caller counts and forwards);
 * XDP_PASS when nothing changed; XDP_ABORTED when it failed half-way. */
static __noinline int apply_to_client(struct xdp_md *ctx, const struct pkt *p,
				      const struct plan *t)
{
	__u32 in_hlen = t->in_hlen, dlen = t->dlen, in_pad = t->in_pad;
	__u32 base = ETH_LEN + (p->v6 ? IP6_LEN : IP4_LEN) + UDP_LEN;
	__u8 zero[4] = {};
	int tail;

	__u32 out_pad = t->pad;

	if (in_hlen > 52 || in_pad > 40 || out_pad > 3 || dlen > 0xffff)
		return XDP_PASS;
	tail = (int)out_pad - (int)in_pad;
	if (tail && bpf_xdp_adjust_tail(ctx, tail))
		return XDP_PASS;
	/* The padding after the data is zeros (the input's may not be). */
	if (out_pad && bpf_xdp_store_bytes(ctx, base + in_hlen + dlen, zero, out_pad & 3))
		return XDP_ABORTED;
	if (in_hlen != t->hlen && bpf_xdp_adjust_head(ctx, (int)in_hlen - (int)t->hlen))
		return XDP_ABORTED;
	if (write_headers(ctx, p, &t->fib, t->server, t->client, t->server_port, t->client_port,
			  t->new_len, t->csum, 0))
		return XDP_ABORTED;
	if (t->hlen == 4) {
		/* Constant offsets in each branch: pointer arithmetic with a value that
		 * depends on a branch is refused without CAP_PERFMON (Spectre v1). */
		void *data = (void *)(long)ctx->data;
		void *end = (void *)(long)ctx->data_end;
		__u32 *cd;

		if (p->v6) {
			cd = data + ETH_LEN + IP6_LEN + UDP_LEN;
			if ((void *)(cd + 1) > end)
				return XDP_ABORTED;
			*cd = *(__u32 *)t->hdr;
		} else {
			cd = data + ETH_LEN + IP4_LEN + UDP_LEN;
			if ((void *)(cd + 1) > end)
				return XDP_ABORTED;
			*cd = *(__u32 *)t->hdr;
		}
	} else if (p->v6) {
		if (bpf_xdp_store_bytes(ctx, base, (void *)t->hdr, 48))
			return XDP_ABORTED;
	} else {
		if (bpf_xdp_store_bytes(ctx, base, (void *)t->hdr, 36))
			return XDP_ABORTED;
	}
	return 0;
}

/* Client to client: a client's data to `peer`, which is another relay of ours with an
 * entry for `relay` (a channel or a permission of its client), goes straight to that
 * client (ChannelData or Data indication from its server address) instead of up as UDP
 * relay -> relay, which the route lookup cannot forward (a local destination). The other
 * client's route is looked up before any byte changes; the packet counts on the
 * sender's entry (to the peer) and on the receiver's (to its client). */
static __noinline int client_to_client(struct xdp_md *ctx, const struct pkt *p)
{
	struct plan *t = scratch_plan();
	int rc;

	if (!t)
		return XDP_PASS;
	rc = plan_to_client(ctx, p, t);
	if (rc)
		return XDP_PASS;
	rc = apply_to_client(ctx, p, t);
	if (rc)
		return rc;
	count(t->from_entry, t->dlen);
	count(t->entry, t->dlen);
	return forward(ctx, &t->fib);
}

/* Fills what client_to_client needs to know of the input: data from `relay` to `peer`,
 * counted on `entry`. TO_CLIENT, or XDP_PASS. */
static __always_inline int c2c_input(const __u32 *relay, __be16 relay_port, const __u32 *peer,
				     __be16 peer_port, __u32 in_hlen, __u32 dlen, __u32 in_pad,
				     __u32 sum, __u32 entry)
{
	struct plan *t = scratch_plan();

	if (!t)
		return XDP_PASS;
	__builtin_memcpy(t->relay, peer, 16);
	__builtin_memcpy(t->src, relay, 16);
	t->relay_port = peer_port;
	t->sport = relay_port;
	t->in_hlen = in_hlen;
	t->dlen = dlen;
	t->in_pad = in_pad;
	t->sum = sum;
	t->c2c = 1;
	t->from_entry = entry;
	return TO_CLIENT;
}

/* Path D: a Send indication from a client (RFC 8656 section 11.2) to a permitted peer ->
 * UDP from the relay to the peer (or, to another relay of ours, client to client). Its
 * attributes, as clients write them: XOR-PEER-ADDRESS (of the packet's family) and DATA
 * once each, in either order, optionally DONT-FRAGMENT (empty; sets DF on the IPv4
 * datagram written) and optionally FINGERPRINT last. FINGERPRINT's CRC-32 is not checked
 * (bpf/README.md says why). At most 4 attributes, each header read once.
 * Any other STUN message, other or repeated attributes, bytes after FINGERPRINT: up. */
#define ATTR_DONT_FRAGMENT 0x001a
#define ATTR_FINGERPRINT 0x8028
#define SEEN_XPA 1
#define SEEN_DATA 2
#define SEEN_DF 4
static __noinline int send_indication(struct xdp_md *ctx, struct pkt *p, void *payload)
{
	void *end = (void *)(long)ctx->data_end;
	__u8 *m = payload;
	__u32 plen = p->udp_len - UDP_LEN;
	__u32 base = ETH_LEN + (p->v6 ? IP6_LEN : IP4_LEN) + UDP_LEN;
	__u32 alen_addr = p->v6 ? 20 : 8;
	struct perm_client_key k = {};
	struct perm_client_val *v;
	struct bpf_fib_lookup fib;
	__u32 h[5] = {};  /* the message header */
	__u32 a[5] = {};  /* XOR-PEER-ADDRESS's value */
	__u32 fp = 0;     /* FINGERPRINT's value */
	__u32 peer[4], relay[4];
	__be16 peer_port, relay_port;
	__u32 off = 20, data_off = 0, len = 0, pad = 0, tail, seen = 0, s = 0;
	__u16 new_len, csum = 0;
	__u32 entry, i, sum = 0, relays_only;
	int rc;

	if ((void *)(m + 20) > end || plen < 20 + 4 + 4 + alen_addr)
		return NOT_MINE;
	if (m[0] != 0x00 || m[1] != 0x16) /* not a Send indication: no need to look further */
		return NOT_MINE;
	if (bpf_xdp_load_bytes(ctx, base, h, 20))
		return NOT_MINE;
	if (h[0] != bpf_htonl(0x00160000 | (plen - 20)) || h[1] != bpf_htonl(STUN_COOKIE))
		return NOT_MINE;
	/* The bytes that go (all but the data) leave the checksum: the header's, here. */
#pragma unroll
	for (i = 0; i < 5; i++)
		s += neg(h[i] >> 16) + neg(h[i] & 0xffff);

#pragma unroll
	for (i = 0; i < 4; i++) {
		__be32 ah;
		__u16 type, alen;

		if (off >= plen)
			break;
		if (off + 4 > plen || bpf_xdp_load_bytes(ctx, base + off, &ah, 4))
			return NOT_MINE;
		type = bpf_ntohl(ah) >> 16;
		alen = bpf_ntohl(ah) & 0xffff;
		s += neg(ah >> 16) + neg(ah & 0xffff);
		if (type == ATTR_XOR_PEER_ADDRESS) {
			if ((seen & SEEN_XPA) || alen != alen_addr || off + 4 + alen > plen)
				return NOT_MINE;
			if (p->v6) {
				if (bpf_xdp_load_bytes(ctx, base + off + 4, a, 20))
					return NOT_MINE;
			} else {
				if (bpf_xdp_load_bytes(ctx, base + off + 4, a, 8))
					return NOT_MINE;
			}
			seen |= SEEN_XPA;
			off += 4 + alen;
		} else if (type == ATTR_DATA) {
			if (seen & SEEN_DATA)
				return NOT_MINE;
			data_off = off + 4;
			len = alen;
			pad = (4 - (len & 3)) & 3;
			if (data_off + len + pad > plen)
				return NOT_MINE;
			seen |= SEEN_DATA;
			off = data_off + len + pad;
		} else if (type == ATTR_DONT_FRAGMENT) {
			if ((seen & SEEN_DF) || alen != 0)
				return NOT_MINE;
			seen |= SEEN_DF;
			off += 4;
		} else if (type == ATTR_FINGERPRINT) {
			/* Last, 4 bytes; its CRC-32 is not checked (bpf/README.md). */
			if (alen != 4 || off + 8 != plen ||
			    bpf_xdp_load_bytes(ctx, base + off + 4, &fp, 4))
				return NOT_MINE;
			s += neg(fp >> 16) + neg(fp & 0xffff);
			off += 8;
		} else {
			return NOT_MINE;
		}
	}
	if (off != plen || (seen & (SEEN_XPA | SEEN_DATA)) != (SEEN_XPA | SEEN_DATA))
		return NOT_MINE;
	/* a[0]: reserved, family, port; then the address, XORed with the cookie and the
	 * transaction id (h[1..5)). */
	if (bpf_ntohl(a[0]) >> 16 != (p->v6 ? 2 : 1))
		return NOT_MINE;
	peer_port = *(__be16 *)((__u8 *)a + 2) ^ bpf_htons(STUN_COOKIE >> 16);
	if (p->v6) {
#pragma unroll
		for (i = 0; i < 4; i++)
			peer[i] = a[1 + i] ^ h[1 + i];
	} else {
		map4(peer, a[1] ^ h[1]);
	}
#pragma unroll
	for (i = 0; i < 5; i++)
		if (i < 2 || p->v6)
			s += neg(a[i] >> 16) + neg(a[i] & 0xffff);
	/* What goes: data_off bytes before the data, `tail` after it (its padding, then
	 * any attributes after DATA). */
	tail = plen - data_off - len;
	if (data_off > 52 || tail > 40)
		return NOT_MINE;

	__builtin_memcpy(k.client, p->src, 16);
	__builtin_memcpy(k.server, p->dst, 16);
	__builtin_memcpy(k.peer, peer, 16);
	k.client_port = p->sport;
	k.server_port = p->dport;
	v = bpf_map_lookup_elem(&perm_by_client, &k);
	if (!v || !same_family(v->relay, p->v6))
		return NOT_MINE;
	__builtin_memcpy(relay, v->relay, 16);
	relay_port = v->relay_port;
	entry = v->entry;
	relays_only = v->flags & PERM_RELAYS_ONLY;

	new_len = len + UDP_LEN;
	if (p->csum) {
		/* What stays: the data (and the pseudo-header's protocol). */
		__u32 old_len = bpf_htons(p->udp_len);

		s += neg(p->csum);
		s += neg(sum_addr(p->src, p->v6)) + neg(sum_addr(p->dst, p->v6));
		s += neg(old_len) + neg(old_len) + neg(p->sport) + neg(p->dport);
		if (neg_padding(ctx, base + data_off + len, len, pad, &s))
			return NOT_MINE;
		sum = fold(fold(s));
	}
	if (!relays_only) {
		rc = route(ctx, &fib, p->v6, relay, peer, relay_port, peer_port, new_len);
		/* A local destination (not forwarded): one of our relays? */
		if (rc == BPF_FIB_LKUP_RET_NOT_FWDED)
			return c2c_input(relay, relay_port, peer, peer_port, data_off, len, tail,
					 sum, entry);
		if (rc)
			return XDP_PASS;
	} else {
		/* The peer policy denies the IP: relayed only to a relay of ours. */
		return c2c_input(relay, relay_port, peer, peer_port, data_off, len, tail, sum,
				 entry);
	}
	if (p->csum) {
		__u32 s2 = sum;
		__u32 nl = bpf_htons(new_len);

		s2 += sum_addr(relay, p->v6) + sum_addr(peer, p->v6);
		s2 += nl + nl + relay_port + peer_port;
		csum = ~fold(fold(s2)) & 0xffff;
		if (csum == 0)
			csum = 0xffff;
	}

	if (tail && bpf_xdp_adjust_tail(ctx, -(int)tail))
		return XDP_PASS;
	if (bpf_xdp_adjust_head(ctx, (int)data_off))
		return XDP_ABORTED;
	if (write_headers(ctx, p, &fib, relay, peer, relay_port, peer_port, new_len, csum,
			  !!(seen & SEEN_DF)))
		return XDP_ABORTED;
	count(entry, len);
	return forward(ctx, &fib);
}

/* Path A: ChannelData from a client -> UDP from the relay to the peer (or, to another
 * relay of ours, client to client). */
static __noinline int client_to_peer(struct xdp_md *ctx, struct pkt *p, void *payload)
{
	void *end = (void *)(long)ctx->data_end;
	struct chan_client_key k = {};
	struct chan_client_val *v;
	struct bpf_fib_lookup fib;
	__u8 *cd = payload;
	__u16 plen = p->udp_len - UDP_LEN;
	__u16 len, pad, new_len, csum = 0;
	__be16 number, len_be;
	__u32 relay[4], peer[4];
	__be16 relay_port, peer_port;
	__u32 entry, sum = 0;
	int perm, rc;

	if ((void *)(cd + 4) > end || plen < 4)
		return NOT_MINE;
	if ((cd[0] & 0xc0) != 0x40) /* not ChannelData */
		return NOT_MINE;
	number = *(__be16 *)cd;
	len_be = *(__be16 *)(cd + 2);
	len = bpf_ntohs(len_be);
	if (plen < 4 + (__u32)len)
		return NOT_MINE; /* truncated */
	pad = plen - 4 - len;
	if (pad != 0 && pad != ((4 - (len & 3)) & 3))
		return NOT_MINE; /* neither unpadded nor padded to 4 */

	__builtin_memcpy(k.client, p->src, 16);
	__builtin_memcpy(k.server, p->dst, 16);
	k.client_port = p->sport;
	k.server_port = p->dport;
	k.number = number;
	v = bpf_map_lookup_elem(&chan_by_client, &k);
	if (!v)
		return NOT_MINE;
	if (!same_family(v->relay, p->v6) || !same_family(v->peer, p->v6))
		return NOT_MINE; /* cross-family: userspace */
	__builtin_memcpy(relay, v->relay, 16);
	__builtin_memcpy(peer, v->peer, 16);
	relay_port = v->relay_port;
	peer_port = v->peer_port;
	entry = v->entry;
	perm = permission(relay, relay_port, peer);
	if (perm == PERM_NONE)
		return NOT_MINE;

	new_len = len + UDP_LEN;
	if (p->csum) {
		/* What stays: the data (and the pseudo-header's protocol). */
		__u32 s = neg(p->csum); /* = sum of everything the checksum covers */
		__u32 old_len = bpf_htons(p->udp_len);

		s += neg(sum_addr(p->src, p->v6)) + neg(sum_addr(p->dst, p->v6));
		s += neg(old_len) + neg(old_len) + neg(p->sport) + neg(p->dport);
		s += neg(number) + neg(len_be);
		/* Padding bytes, each at UDP offset 12 + len + i. */
		if (neg_padding(ctx, ETH_LEN + (p->v6 ? IP6_LEN : IP4_LEN) + UDP_LEN + 4 + len,
				len, pad, &s))
			return NOT_MINE;
		sum = fold(fold(s));
	}
	if (perm == PERM_OK) {
		rc = route(ctx, &fib, p->v6, relay, peer, relay_port, peer_port, new_len);
		/* A local destination (not forwarded): one of our relays? */
		if (rc == BPF_FIB_LKUP_RET_NOT_FWDED)
			return c2c_input(relay, relay_port, peer, peer_port, 4, len, pad, sum,
					 entry);
		if (rc)
			return XDP_PASS;
	} else {
		/* The peer policy denies the IP: relayed only to a relay of ours. */
		return c2c_input(relay, relay_port, peer, peer_port, 4, len, pad, sum, entry);
	}
	if (p->csum) {
		__u32 s = sum;
		__u32 nl = bpf_htons(new_len);

		s += sum_addr(relay, p->v6) + sum_addr(peer, p->v6);
		s += nl + nl + relay_port + peer_port;
		csum = ~fold(fold(s)) & 0xffff;
		if (csum == 0)
			csum = 0xffff;
	}

	if (pad && bpf_xdp_adjust_tail(ctx, -(int)pad))
		return XDP_PASS;
	if (bpf_xdp_adjust_head(ctx, 4))
		return XDP_ABORTED;
	if (write_headers(ctx, p, &fib, relay, peer, relay_port, peer_port, new_len, csum, 0))
		return XDP_ABORTED;
	count(entry, len);
	return forward(ctx, &fib);
}

/* Paths B and C: UDP from a peer to a relay -> ChannelData (channel bound) or a Data
 * indication (a permission, no channel) from the server to the client. */
static __noinline int peer_to_client(struct xdp_md *ctx, struct pkt *p)
{
	struct plan *t = scratch_plan();
	__u32 dlen = p->udp_len - UDP_LEN;
	__u32 sum = 0;
	int rc;

	if (p->csum) {
		/* What stays: the data (and the pseudo-header's protocol). */
		__u32 s = neg(p->csum);
		__u32 old_len = bpf_htons(p->udp_len);

		s += neg(sum_addr(p->src, p->v6)) + neg(sum_addr(p->dst, p->v6));
		s += neg(old_len) + neg(old_len) + neg(p->sport) + neg(p->dport);
		sum = fold(fold(s));
	}
	if (!t)
		return XDP_PASS;
	__builtin_memcpy(t->relay, p->dst, 16);
	__builtin_memcpy(t->src, p->src, 16);
	t->relay_port = p->dport;
	t->sport = p->sport;
	t->in_hlen = 0;
	t->dlen = dlen;
	t->in_pad = 0;
	t->sum = sum;
	t->c2c = 0;
	rc = plan_to_client(ctx, p, t);
	if (rc)
		return rc;
	rc = apply_to_client(ctx, p, t);
	if (rc)
		return rc;
	count(t->entry, dlen);
	return forward(ctx, &t->fib);
}

SEC("xdp")
int xdp_relay(struct xdp_md *ctx)
{
	struct pkt p = {};
	void *payload;
	void *end;
	int rc = NOT_MINE;

	if (parse(ctx, &p, &payload))
		return XDP_PASS;
	end = (void *)(long)ctx->data_end;
	/* Client paths first for what may be STUN or ChannelData, then the peer paths (a
	 * peer's datagram may look like anything). A path that does not act returns
	 * NOT_MINE with the frame untouched. */
	if ((void *)((__u8 *)payload + 1) <= end) {
		__u8 first = *(__u8 *)payload & 0xc0;

		if (first == 0x40)
			rc = client_to_peer(ctx, &p, payload);
		else if (first == 0)
			rc = send_indication(ctx, &p, payload);
	}
	if (rc == TO_CLIENT)
		return client_to_client(ctx, &p);
	if (rc == NOT_MINE)
		rc = peer_to_client(ctx, &p);
	return rc == NOT_MINE ? XDP_PASS : rc;
}

char LICENSE[] SEC("license") = "GPL";
