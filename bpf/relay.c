/* turnstone's XDP fast path: ChannelData and Send/Data indications <-> UDP for entries userspace installed, out of the interface the routing table chooses; everything else goes up unchanged (XDP_PASS). See bpf/README.md. */
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

static __always_inline int parse(struct xdp_md *ctx, struct pkt *p, void **payload)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct udphdr *udp;
	__u32 l3len;

	if ((void *)(eth + 1) > end)
		return -1;
	l3len = (__u32)(end - data) - ETH_LEN;

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
	*payload = udp + 1;
	return 0;
}

static __always_inline int same_family(const __u32 *a, int v6)
{
	return v6 ? !is_mapped4(a) : is_mapped4(a);
}

/* The route of the packet to be written (src -> dst, UDP of udp_len bytes): 0 with *fib
 * holding the output interface and MACs when the lookup succeeds (which includes the
 * route's MTU check: tot_len), -1 otherwise (no route, no neighbour yet, blackhole,
 * fragmentation needed, forwarding disabled on the ingress interface...). Changes no
 * packet byte: a caller that gets -1 passes the frame up untouched. */
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
	if (bpf_fib_lookup(ctx, fib, sizeof(*fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return -1;
	return 0;
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
					 __u16 udp_len, __u16 csum)
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
		ip->frag_off = 0;
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

static __always_inline int permitted(const __u32 *relay, __be16 relay_port, const __u32 *peer)
{
	struct perm_relay_key k = {};
	struct perm_val *v;

	__builtin_memcpy(k.relay, relay, 16);
	__builtin_memcpy(k.peer, peer, 16);
	k.relay_port = relay_port;
	v = bpf_map_lookup_elem(&perm_by_relay, &k);
	return v && !(v->flags & PERM_RELAYS_ONLY);
}

/* Path D: a Send indication from a client (RFC 8656 section 11.2) with exactly
 * XOR-PEER-ADDRESS then DATA, to a permitted peer -> UDP from the relay to the peer.
 * Any other STUN message, or other attributes (FINGERPRINT, DONT-FRAGMENT...): up. */
static __noinline int send_indication(struct xdp_md *ctx, struct pkt *p, void *payload)
{
	void *end = (void *)(long)ctx->data_end;
	__u8 *m = payload;
	__u16 plen = p->udp_len - UDP_LEN;
	__u32 hlen = p->v6 ? 48 : 36;
	__u32 base = ETH_LEN + (p->v6 ? IP6_LEN : IP4_LEN) + UDP_LEN;
	struct perm_client_key k = {};
	struct perm_client_val *v;
	struct bpf_fib_lookup fib;
	__u8 h[48] = {};
	__u32 peer[4], relay[4];
	__be16 peer_port, relay_port;
	__u16 len, pad, new_len, csum = 0;
	__u32 entry, i;

	if ((void *)(m + 20) > end || plen < hlen)
		return NOT_MINE;
	if (m[0] != 0x00 || m[1] != 0x16) /* not a Send indication: no need to look further */
		return NOT_MINE;
	if (p->v6) {
		if (bpf_xdp_load_bytes(ctx, base, h, 48))
			return NOT_MINE;
	} else {
		if (bpf_xdp_load_bytes(ctx, base, h, 36))
			return NOT_MINE;
	}
	if (*(__be16 *)&h[0] != bpf_htons(0x0016) || *(__be32 *)&h[4] != bpf_htonl(STUN_COOKIE))
		return NOT_MINE;
	if (bpf_ntohs(*(__be16 *)&h[2]) != plen - 20)
		return NOT_MINE;
	/* XOR-PEER-ADDRESS of the packet's family (the relay's must be the same). */
	if (*(__be16 *)&h[20] != bpf_htons(ATTR_XOR_PEER_ADDRESS) ||
	    *(__be16 *)&h[22] != bpf_htons(p->v6 ? 20 : 8) || h[24] != 0 ||
	    h[25] != (p->v6 ? 2 : 1))
		return NOT_MINE;
	peer_port = *(__be16 *)&h[26] ^ bpf_htons(STUN_COOKIE >> 16);
	if (p->v6) {
#pragma unroll
		for (i = 0; i < 4; i++)
			peer[i] = *(__u32 *)&h[28 + 4 * i] ^ *(__u32 *)&h[4 + 4 * i];
		if (*(__be16 *)&h[44] != bpf_htons(ATTR_DATA))
			return NOT_MINE;
		len = bpf_ntohs(*(__be16 *)&h[46]);
	} else {
		map4(peer, *(__u32 *)&h[28] ^ bpf_htonl(STUN_COOKIE));
		if (*(__be16 *)&h[32] != bpf_htons(ATTR_DATA))
			return NOT_MINE;
		len = bpf_ntohs(*(__be16 *)&h[34]);
	}
	/* DATA is last, padded to 4 exactly. */
	pad = (4 - (len & 3)) & 3;
	if ((__u32)plen != hlen + len + pad)
		return NOT_MINE;

	__builtin_memcpy(k.client, p->src, 16);
	__builtin_memcpy(k.server, p->dst, 16);
	__builtin_memcpy(k.peer, peer, 16);
	k.client_port = p->sport;
	k.server_port = p->dport;
	v = bpf_map_lookup_elem(&perm_by_client, &k);
	if (!v || (v->flags & PERM_RELAYS_ONLY) || !same_family(v->relay, p->v6))
		return NOT_MINE;
	__builtin_memcpy(relay, v->relay, 16);
	relay_port = v->relay_port;
	entry = v->entry;

	new_len = len + UDP_LEN;
	if (p->csum) {
		__u32 s = neg(p->csum);
		__u32 old_len = bpf_htons(p->udp_len);
		__u32 nl = bpf_htons(new_len);

		s += neg(sum_addr(p->src, p->v6)) + neg(sum_addr(p->dst, p->v6));
		s += neg(old_len) + neg(old_len) + neg(p->sport) + neg(p->dport);
#pragma unroll
		for (i = 0; i < 48; i += 2) /* the message before the data (zero past hlen) */
			s += neg(*(__u16 *)&h[i]);
		if (neg_padding(ctx, base + hlen + len, len, pad, &s))
			return NOT_MINE;
		s += sum_addr(relay, p->v6) + sum_addr(peer, p->v6);
		s += nl + nl + relay_port + peer_port;
		csum = ~fold(fold(s)) & 0xffff;
		if (csum == 0)
			csum = 0xffff;
	}
	if (route(ctx, &fib, p->v6, relay, peer, relay_port, peer_port, new_len))
		return XDP_PASS;

	if (pad && bpf_xdp_adjust_tail(ctx, -(int)pad))
		return XDP_PASS;
	if (bpf_xdp_adjust_head(ctx, (int)hlen))
		return XDP_ABORTED;
	if (write_headers(ctx, p, &fib, relay, peer, relay_port, peer_port, new_len, csum))
		return XDP_ABORTED;
	count(entry, len);
	return forward(ctx, &fib);
}

/* Path A: ChannelData from a client -> UDP from the relay to the peer. */
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
	__u32 entry;

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
	if (!permitted(relay, relay_port, peer))
		return NOT_MINE;

	new_len = len + UDP_LEN;
	if (p->csum) {
		__u32 s = neg(p->csum); /* = sum of everything the checksum covers */
		__u32 old_len = bpf_htons(p->udp_len);
		__u32 nl = bpf_htons(new_len);

		s += neg(sum_addr(p->src, p->v6)) + neg(sum_addr(p->dst, p->v6));
		s += neg(old_len) + neg(old_len) + neg(p->sport) + neg(p->dport);
		s += neg(number) + neg(len_be);
		/* Padding bytes, each at UDP offset 12 + len + i. */
		if (neg_padding(ctx, ETH_LEN + (p->v6 ? IP6_LEN : IP4_LEN) + UDP_LEN + 4 + len,
				len, pad, &s))
			return NOT_MINE;
		s += sum_addr(relay, p->v6) + sum_addr(peer, p->v6);
		s += nl + nl + relay_port + peer_port;
		csum = ~fold(fold(s)) & 0xffff;
		if (csum == 0)
			csum = 0xffff;
	}
	if (route(ctx, &fib, p->v6, relay, peer, relay_port, peer_port, new_len))
		return XDP_PASS;

	if (pad && bpf_xdp_adjust_tail(ctx, -(int)pad))
		return XDP_PASS;
	if (bpf_xdp_adjust_head(ctx, 4))
		return XDP_ABORTED;
	if (write_headers(ctx, p, &fib, relay, peer, relay_port, peer_port, new_len, csum))
		return XDP_ABORTED;
	count(entry, len);
	return forward(ctx, &fib);
}

/* Path C: UDP from a permitted peer to the relay, no channel -> Data indication (RFC 8656
 * section 11.3: XOR-PEER-ADDRESS, DATA) from the server to the client. */
static __noinline int data_indication(struct xdp_md *ctx, struct pkt *p)
{
	struct perm_relay_key k = {};
	struct perm_val *v;
	struct bpf_fib_lookup fib;
	__u32 client[4], server[4];
	__be16 client_port, server_port;
	__u16 dlen = p->udp_len - UDP_LEN;
	__u16 pad = (4 - (dlen & 3)) & 3;
	__u32 hlen = p->v6 ? 48 : 36; /* STUN header, XOR-PEER-ADDRESS, DATA's header */
	__u16 new_len, csum = 0;
	__u32 entry, mtu = 0, off, i;
	__u8 ind[48] = {};
	__u8 zero[4] = {};

	__builtin_memcpy(k.relay, p->dst, 16);
	__builtin_memcpy(k.peer, p->src, 16);
	k.relay_port = p->dport;
	v = bpf_map_lookup_elem(&perm_by_relay, &k);
	if (!v)
		return NOT_MINE;
	if (v->flags & PERM_RELAYS_ONLY)
		return XDP_PASS;
	if (!same_family(v->client, p->v6) || !same_family(v->server, p->v6))
		return XDP_PASS;
	__builtin_memcpy(client, v->client, 16);
	__builtin_memcpy(server, v->server, 16);
	client_port = v->client_port;
	server_port = v->server_port;
	entry = v->entry;

	if (p->udp_len > 0xffff - IP4_LEN - 48 - 3)
		return XDP_PASS;
	new_len = p->udp_len + hlen + pad;
	if (route(ctx, &fib, p->v6, server, client, server_port, client_port, new_len))
		return XDP_PASS;
	if (bpf_check_mtu(ctx, fib.ifindex, &mtu, hlen + pad, 0))
		return XDP_PASS;

	/* The message: header, XOR-PEER-ADDRESS, DATA's type and length. */
	*(__be16 *)&ind[0] = bpf_htons(0x0017);
	*(__be16 *)&ind[2] = bpf_htons(hlen - 20 + dlen + pad);
	*(__be32 *)&ind[4] = bpf_htonl(STUN_COOKIE);
	*(__u32 *)&ind[8] = bpf_get_prandom_u32();
	*(__u32 *)&ind[12] = bpf_get_prandom_u32();
	*(__u32 *)&ind[16] = bpf_get_prandom_u32();
	*(__be16 *)&ind[20] = bpf_htons(ATTR_XOR_PEER_ADDRESS);
	*(__be16 *)&ind[22] = bpf_htons(p->v6 ? 20 : 8);
	ind[25] = p->v6 ? 2 : 1;
	*(__be16 *)&ind[26] = p->sport ^ bpf_htons(STUN_COOKIE >> 16);
	if (p->v6) {
		/* XORed with the cookie and the transaction id: ind[4..20). */
#pragma unroll
		for (i = 0; i < 4; i++)
			*(__u32 *)&ind[28 + 4 * i] = p->src[i] ^ *(__u32 *)&ind[4 + 4 * i];
		*(__be16 *)&ind[44] = bpf_htons(ATTR_DATA);
		*(__be16 *)&ind[46] = bpf_htons(dlen);
	} else {
		*(__u32 *)&ind[28] = p->src[3] ^ bpf_htonl(STUN_COOKIE);
		*(__be16 *)&ind[32] = bpf_htons(ATTR_DATA);
		*(__be16 *)&ind[34] = bpf_htons(dlen);
	}

	if (p->csum) {
		__u32 s = neg(p->csum);
		__u32 old_len = bpf_htons(p->udp_len);
		__u32 nl = bpf_htons(new_len);

		s += neg(sum_addr(p->src, p->v6)) + neg(sum_addr(p->dst, p->v6));
		s += neg(old_len) + neg(old_len) + neg(p->sport) + neg(p->dport);
		s += sum_addr(server, p->v6) + sum_addr(client, p->v6);
		s += nl + nl + server_port + client_port;
		/* The message before the data (zero past hlen); the padding is zeros. */
#pragma unroll
		for (i = 0; i < 48; i += 2)
			s += *(__u16 *)&ind[i];
		csum = ~fold(fold(s)) & 0xffff;
		if (csum == 0)
			csum = 0xffff;
	}

	off = ETH_LEN + (p->v6 ? IP6_LEN : IP4_LEN) + UDP_LEN;
	if (pad) {
		if (bpf_xdp_adjust_tail(ctx, pad))
			return XDP_PASS;
		if (pad > 3 || bpf_xdp_store_bytes(ctx, off + dlen, zero, pad))
			return XDP_ABORTED;
	}
	if (bpf_xdp_adjust_head(ctx, -(int)hlen))
		return XDP_ABORTED;
	if (write_headers(ctx, p, &fib, server, client, server_port, client_port, new_len, csum))
		return XDP_ABORTED;
	if (p->v6) {
		if (bpf_xdp_store_bytes(ctx, ETH_LEN + IP6_LEN + UDP_LEN, ind, 48))
			return XDP_ABORTED;
	} else {
		if (bpf_xdp_store_bytes(ctx, ETH_LEN + IP4_LEN + UDP_LEN, ind, 36))
			return XDP_ABORTED;
	}
	count(entry, dlen);
	return forward(ctx, &fib);
}

/* Path B: UDP from a peer to the relay, channel bound -> ChannelData to the client. */
static __noinline int peer_to_client(struct xdp_md *ctx, struct pkt *p)
{
	struct chan_relay_key k = {};
	struct chan_relay_val *v;
	struct bpf_fib_lookup fib;
	__u32 client[4], server[4];
	__be16 client_port, server_port, number;
	__u16 dlen = p->udp_len - UDP_LEN;
	__u16 new_len, csum = 0;
	__u32 entry, mtu = 0;
	void *data, *end;

	__builtin_memcpy(k.relay, p->dst, 16);
	__builtin_memcpy(k.peer, p->src, 16);
	k.relay_port = p->dport;
	k.peer_port = p->sport;
	v = bpf_map_lookup_elem(&chan_by_relay, &k);
	if (!v)
		return NOT_MINE; /* no channel: data_indication's */
	if (!same_family(v->client, p->v6) || !same_family(v->server, p->v6))
		return XDP_PASS;
	__builtin_memcpy(client, v->client, 16);
	__builtin_memcpy(server, v->server, 16);
	client_port = v->client_port;
	server_port = v->server_port;
	number = v->number;
	entry = v->entry;
	if (!permitted(p->dst, p->dport, p->src))
		return XDP_PASS;

	if (p->udp_len > 0xffff - 4 - IP4_LEN)
		return XDP_PASS;
	new_len = p->udp_len + 4;
	if (route(ctx, &fib, p->v6, server, client, server_port, client_port, new_len))
		return XDP_PASS;
	if (bpf_check_mtu(ctx, fib.ifindex, &mtu, 4, 0))
		return XDP_PASS; /* the result would exceed the output interface's MTU */

	if (p->csum) {
		__u32 s = neg(p->csum);
		__u32 old_len = bpf_htons(p->udp_len);
		__u32 nl = bpf_htons(new_len);

		s += neg(sum_addr(p->src, p->v6)) + neg(sum_addr(p->dst, p->v6));
		s += neg(old_len) + neg(old_len) + neg(p->sport) + neg(p->dport);
		s += sum_addr(server, p->v6) + sum_addr(client, p->v6);
		s += nl + nl + server_port + client_port;
		s += number + bpf_htons(dlen);
		csum = ~fold(fold(s)) & 0xffff;
		if (csum == 0)
			csum = 0xffff;
	}

	if (bpf_xdp_adjust_head(ctx, -4))
		return XDP_PASS;
	if (write_headers(ctx, p, &fib, server, client, server_port, client_port, new_len, csum))
		return XDP_ABORTED;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	{
		__u32 off = ETH_LEN + (p->v6 ? IP6_LEN : IP4_LEN) + UDP_LEN;
		__be16 *cd = data + off;

		if ((void *)(cd + 2) > end)
			return XDP_ABORTED;
		cd[0] = number;
		cd[1] = bpf_htons(dlen);
	}
	count(entry, dlen);
	return forward(ctx, &fib);
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
	if (rc == NOT_MINE)
		rc = peer_to_client(ctx, &p);
	if (rc == NOT_MINE)
		rc = data_indication(ctx, &p);
	return rc == NOT_MINE ? XDP_PASS : rc;
}

char LICENSE[] SEC("license") = "GPL";
