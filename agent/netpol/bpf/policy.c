// Nova network policy: tc clsact direct-action programs on the HOST end of a
// container's veth. Loaded once by agent/netpol/ebpf.py; a policy change only
// rewrites the maps below.
//
//   nova_from_ctr  tc ingress of the host veth = packets the container SENDS    (its egress)
//   nova_to_ctr    tc egress  of the host veth = packets delivered TO the container (its ingress)
//
// Verdict for a packet at endpoint E in direction D:
//   1. not IPv4: ARP passes; anything else passes only if E is not isolated in D
//   2. sent by E with a source address that is not E's: dropped (spoofing)
//   3. E tracked the flow in D (or its reverse in the other direction): passes
//   4. E not isolated in D: passes, flow recorded
//   5. peer identity = nova_ipcache_v1[peer address] (else WORLD); if nova_policy_v1 has
//      (E, identity, D, protocol, port prefix) the packet passes and its flow is recorded;
//   6. else the same with the identity of the most specific rule CIDR holding the peer
//      address (nova_cidrs_v1); else dropped.
// Every verdict is counted in nova_counters_v1 at the index the matching entry names.
// Drops are also reported on the nova_drops_v1 ring buffer, at most nova_droplog_v1's
// rate per second over all CPUs (0: off, the default); ebpf.py logs them.

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>

#define DIR_INGRESS 0 // to the endpoint
#define DIR_EGRESS 1  // from the endpoint
#define IDENTITY_WORLD 2

// Fixed counter slots; policies get slots from FIRST_POLICY_COUNTER (ebpf.py).
#define COUNTER_UNISOLATED 0 // allowed: endpoint not isolated in that direction
#define COUNTER_ESTABLISHED 1 // allowed: tracked flow or its reply
#define COUNTER_SPOOFED 2 // denied: source address is not the endpoint's
#define COUNTER_NOT_IPV4 3 // denied: non-IPv4, non-ARP on an isolated endpoint
#define MAX_COUNTERS 16384

// Rule CIDR -> its CIDR identity (ebpf_keys.py).
struct cidr_key {
    u32 prefixlen;
    u32 addr; // network byte order
};

// Allowed (endpoint, peer identity, direction, protocol, port prefix). A port
// range is stored as its few covering prefixes (at most 30), never per port.
// protocol 0 with prefixlen 80: any protocol, any port.
struct policy_key {
    u32 prefixlen; // 80 fixed bits + 0..16 port bits
    u32 endpoint;  // ifindex of the host veth
    u32 identity;  // peer identity
    u8 direction;  // DIR_*
    u8 protocol;   // IPPROTO_*, 0: any
    u16 port;      // network byte order, so prefix bits run from the top
};

struct policy_value {
    u32 counter; // slot in nova_counters_v1 of the policy that allowed
};

struct endpoint_config {
    u32 addr; // the endpoint's own address, network byte order
    u8 isolated[2]; // by DIR_*
    u8 pad[2];
    u32 deny_counter[2]; // slot charged with a denial, by DIR_*
};

// A flow as one endpoint saw it in one direction: tracking is per endpoint, so a
// flow one side allowed is never "established" for the other side's check.
struct ct_key {
    u32 endpoint;
    u32 saddr;
    u32 daddr;
    u16 sport;
    u16 dport;
    u8 protocol;
    u8 direction; // in which the flow's first packet was allowed
    u8 pad[2];
};

struct counter {
    u64 allowed;
    u64 denied;
};

// Drop logging: a fixed one-second window shared by every CPU (approximate on purpose:
// a race lets a few more through, never fewer, and costs no lock).
struct droplog {
    u64 window_ns; // start of the current window
    u32 rate;      // events per second; 0: drop logging off
    u32 sent;      // events in the current window
};

struct drop_event {
    u32 endpoint; // ifindex of the host veth
    u32 saddr;    // network byte order
    u32 daddr;
    u16 sport;    // network byte order
    u16 dport;
    u32 counter;  // slot the drop was charged to
    u8 protocol;
    u8 direction;
    u8 pad[2];
};

BPF_ARRAY(nova_droplog_v1, struct droplog, 1);
BPF_RINGBUF_OUTPUT(nova_drops_v1, 16); // pages
BPF_HASH(nova_ipcache_v1, u32, u32, 262144); // endpoint address (network order) -> identity
BPF_LPM_TRIE(nova_cidrs_v1, struct cidr_key, u32, 262144);
BPF_LPM_TRIE(nova_policy_v1, struct policy_key, struct policy_value, 1048576);
BPF_HASH(nova_endpoints_v1, u32, struct endpoint_config, 65536);
// Flow -> when it last passed (ktime ns). An entry idle longer than its timeout no
// longer counts: the flow's next packet meets the policy again, so a flow the policy
// stopped allowing does not pass forever (LRU eviction alone would keep it).
BPF_TABLE("lru_hash", struct ct_key, u64, nova_ct_v1, 262144);
#define CT_IDLE_TCP_NS (3600ULL * 1000000000ULL) // no TCP state machine: a long idle timeout
#define CT_IDLE_OTHER_NS (120ULL * 1000000000ULL) // UDP and the rest, as conntrack's streams
#define CT_REFRESH_NS 1000000000ULL // rewrite last-seen at most once a second per entry
BPF_PERCPU_ARRAY(nova_counters_v1, struct counter, MAX_COUNTERS);

static __always_inline void count(u32 slot, int allowed) {
    struct counter *c = nova_counters_v1.lookup(&slot);
    if (c) {
        if (allowed)
            c->allowed++;
        else
            c->denied++;
    }
}

static __always_inline void log_drop(u32 endpoint, struct ct_key *flow, u32 slot) {
    u32 zero = 0;
    struct droplog *cfg = nova_droplog_v1.lookup(&zero);
    if (!cfg || !cfg->rate)
        return;
    u64 now = bpf_ktime_get_ns();
    if (now - cfg->window_ns >= 1000000000ULL) {
        cfg->window_ns = now;
        cfg->sent = 0;
    }
    if (cfg->sent >= cfg->rate)
        return;
    __sync_fetch_and_add(&cfg->sent, 1);
    struct drop_event ev = {};
    ev.endpoint = endpoint;
    ev.saddr = flow->saddr;
    ev.daddr = flow->daddr;
    ev.sport = flow->sport;
    ev.dport = flow->dport;
    ev.counter = slot;
    ev.protocol = flow->protocol;
    ev.direction = flow->direction;
    nova_drops_v1.ringbuf_output(&ev, sizeof(ev), 0);
}

// True if `key` is a live tracked flow; refreshes its last-seen time.
static __always_inline int tracked(struct ct_key *key, u64 now) {
    u64 *seen = nova_ct_v1.lookup(key);
    if (!seen)
        return 0;
    u64 idle = key->protocol == IPPROTO_TCP ? CT_IDLE_TCP_NS : CT_IDLE_OTHER_NS;
    if (now - *seen > idle) {
        nova_ct_v1.delete(key);
        return 0;
    }
    if (now - *seen > CT_REFRESH_NS)
        *seen = now;
    return 1;
}

static __always_inline struct policy_value *lookup_policy(u32 endpoint, u32 identity,
                                                          u8 direction, u8 protocol, u16 port) {
    struct policy_key key = {};
    key.prefixlen = 96;
    key.endpoint = endpoint;
    key.identity = identity;
    key.direction = direction;
    key.protocol = protocol;
    key.port = port;
    struct policy_value *allow = nova_policy_v1.lookup(&key);
    if (allow)
        return allow;
    key.protocol = 0; // rules without ports: any protocol
    key.port = 0;
    return nova_policy_v1.lookup(&key);
}

static __always_inline int verdict(struct __sk_buff *skb, int direction) {
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    u32 endpoint = skb->ifindex;
    struct endpoint_config *cfg = nova_endpoints_v1.lookup(&endpoint);
    if (!cfg)
        return TC_ACT_OK; // not an endpoint this program enforces (yet)

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return TC_ACT_SHOT;
    if (eth->h_proto == bpf_htons(ETH_P_ARP))
        return TC_ACT_OK;
    if (eth->h_proto != bpf_htons(ETH_P_IP)) {
        if (!cfg->isolated[direction])
            return TC_ACT_OK;
        count(COUNTER_NOT_IPV4, 0);
        return TC_ACT_SHOT;
    }
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end)
        return TC_ACT_SHOT;
    struct ct_key flow = {};
    flow.endpoint = endpoint;
    flow.direction = direction;
    flow.saddr = ip->saddr;
    flow.daddr = ip->daddr;
    flow.protocol = ip->protocol;
    if (direction == DIR_EGRESS && ip->saddr != cfg->addr) {
        count(COUNTER_SPOOFED, 0);
        log_drop(endpoint, &flow, COUNTER_SPOOFED);
        return TC_ACT_SHOT;
    }
    u16 port = 0;
    // Ports of TCP, UDP and SCTP sit at the same offsets; later fragments carry none.
    if ((ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP ||
         ip->protocol == IPPROTO_SCTP) &&
        !(ip->frag_off & bpf_htons(0x1fff))) {
        u16 *ports = (void *)ip + ip->ihl * 4;
        if ((void *)(ports + 2) > data_end)
            return TC_ACT_SHOT;
        flow.sport = ports[0];
        flow.dport = ports[1];
        port = ports[1];
    }
    u64 now = bpf_ktime_get_ns();
    if (tracked(&flow, now)) {
        count(COUNTER_ESTABLISHED, 1);
        return TC_ACT_OK;
    }
    struct ct_key reply = {};
    reply.endpoint = endpoint;
    reply.direction = !direction;
    reply.saddr = flow.daddr;
    reply.daddr = flow.saddr;
    reply.sport = flow.dport;
    reply.dport = flow.sport;
    reply.protocol = flow.protocol;
    if (tracked(&reply, now)) {
        count(COUNTER_ESTABLISHED, 1);
        return TC_ACT_OK;
    }
    u64 seen = now;
    if (!cfg->isolated[direction]) {
        nova_ct_v1.update(&flow, &seen);
        count(COUNTER_UNISOLATED, 1);
        return TC_ACT_OK;
    }

    u32 peer = direction == DIR_INGRESS ? ip->saddr : ip->daddr;
    u32 *found = nova_ipcache_v1.lookup(&peer);
    struct policy_value *allow = lookup_policy(endpoint, found ? *found : IDENTITY_WORLD,
                                               direction, ip->protocol, port);
    if (!allow) {
        struct cidr_key prefix = {32, peer};
        u32 *cidr_identity = nova_cidrs_v1.lookup(&prefix);
        if (cidr_identity)
            allow = lookup_policy(endpoint, *cidr_identity, direction, ip->protocol, port);
    }
    if (allow) {
        nova_ct_v1.update(&flow, &seen);
        count(allow->counter, 1);
        return TC_ACT_OK;
    }
    count(cfg->deny_counter[direction], 0);
    log_drop(endpoint, &flow, cfg->deny_counter[direction]);
    return TC_ACT_SHOT;
}

int nova_from_ctr(struct __sk_buff *skb) { return verdict(skb, DIR_EGRESS); }

int nova_to_ctr(struct __sk_buff *skb) { return verdict(skb, DIR_INGRESS); }
