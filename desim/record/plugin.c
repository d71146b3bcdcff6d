/*
 * desim_record: a QEMU TCG plugin that records, per vCPU and per interval of
 * wall-clock time, which guest pages the vCPU read, wrote or executed.
 *
 * Built by `desim record` against the qemu-plugin.h of the QEMU it runs
 * (QEMU 7.2, plugin API version 1; see desim/record/build.py).
 *
 * Data pages are what QEMU 7.2's qemu_plugin_hwaddr_phys_addr() returns (plugins/api.c):
 * for RAM not a guest-physical address but block->offset + offset +
 * block->mr->addr, i.e. the RAM block's ram_addr plus its memory region's
 * own address; instruction pages are host virtual addresses
 * (qemu_plugin_insn_haddr(), recorded with bit NS_HVA set). desim translates
 * both to guest-physical pages afterwards from `info ramblock`,
 * `info mtree [-f]` and the host address of the guest RAM file
 * (desim/record/convert.py).
 *
 * Time: CLOCK_REALTIME (the clock of QEMU's `-msg timestamp=on` trace
 * lines). A vCPU's interval ends when its thread notices the clock passed
 * the interval's end: every 32 translation blocks it executes, and when it
 * halts or resumes (the vCPU idle / resume callbacks, called from the vCPU's
 * own thread in qemu_wait_io_event), so per-vCPU state needs no lock.
 *
 * Output (little endian, native struct layout of x86-64):
 *   header: "DSMREC01", u64 t0_ns, u64 interval_ns, u32 max_vcpus, u32 0 x 3
 *   row:    u32 1, u32 vcpu, u32 interval, u32 npages, u64 insns, u64 idle_ns,
 *           u64 mmio_accesses, then npages x u64 (page << 3 | flags)
 *           flags: 1 read, 2 write, 4 execute
 *   thread: u32 2, u32 vcpu, u32 thread id (gettid), u32 0
 *   end:    u32 3, u32 0, u64 t_end_ns
 *
 * SPDX-License-Identifier: GPL-2.0-or-later (it links against QEMU's plugin API)
 */
#include <glib.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

enum { F_READ = 1, F_WRITE = 2, F_EXEC = 4 };
#define NS_HVA (1ull << 57)  /* page numbers of host virtual addresses (instructions) */

typedef struct {
    GHashTable *pages;      /* host page -> flags, this interval */
    uint64_t interval;      /* current interval index */
    uint64_t insns;
    uint64_t idle_ns;
    uint64_t mmio;
    uint64_t idle_since;    /* 0: running */
    uint64_t last_page;     /* one-entry cache in front of the hash table */
    unsigned last_flags;
    unsigned tbs;
    bool tid_known;
} VcpuState;

typedef struct {
    uint64_t insns;
    uint64_t page0, page1;  /* host pages of the first and last instruction (0: none) */
} TbInfo;

static VcpuState *vcpus;
static int max_vcpus;
static uint64_t t0_ns, interval_ns = 10 * 1000 * 1000;
static FILE *out;
static GMutex out_lock;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t interval_of(uint64_t t)
{
    return t <= t0_ns ? 0 : (t - t0_ns) / interval_ns;
}

static void write_u32s(uint32_t a, uint32_t b, uint32_t c, uint32_t d)
{
    uint32_t w[4] = {a, b, c, d};
    fwrite(w, sizeof(w), 1, out);
}

/* Write the vCPU's current interval (if anything happened in it) and start a new one. */
static void flush_row(VcpuState *v, unsigned idx)
{
    guint n = g_hash_table_size(v->pages);
    if (n == 0 && v->insns == 0 && v->mmio == 0) {
        v->idle_ns = 0;
        return;
    }
    uint64_t *buf = g_new(uint64_t, n ? n : 1);
    GHashTableIter it;
    gpointer key, val;
    guint i = 0;
    g_hash_table_iter_init(&it, v->pages);
    while (g_hash_table_iter_next(&it, &key, &val)) {
        buf[i++] = ((uint64_t)GPOINTER_TO_SIZE(key) << 3) | GPOINTER_TO_UINT(val);
    }
    g_mutex_lock(&out_lock);
    write_u32s(1, idx, (uint32_t)v->interval, n);
    uint64_t q[3] = {v->insns, v->idle_ns, v->mmio};
    fwrite(q, sizeof(q), 1, out);
    fwrite(buf, sizeof(uint64_t), n, out);
    g_mutex_unlock(&out_lock);
    g_free(buf);
    g_hash_table_remove_all(v->pages);
    v->insns = v->idle_ns = v->mmio = 0;
    v->last_page = 0;
    v->last_flags = 0;
}

static void roll_to(VcpuState *v, unsigned idx, uint64_t t)
{
    uint64_t k = interval_of(t);
    if (k != v->interval) {
        flush_row(v, idx);
        v->interval = k;
    }
}

static inline void touch(VcpuState *v, uint64_t page, unsigned flag)
{
    if (page == v->last_page && (v->last_flags & flag)) {
        return;
    }
    gpointer key = GSIZE_TO_POINTER(page);
    unsigned f = GPOINTER_TO_UINT(g_hash_table_lookup(v->pages, key));
    if (!(f & flag)) {
        f |= flag;
        g_hash_table_insert(v->pages, key, GUINT_TO_POINTER(f));
    }
    v->last_page = page;
    v->last_flags = f;
}

static void vcpu_mem(unsigned int idx, qemu_plugin_meminfo_t info, uint64_t vaddr, void *udata)
{
    struct qemu_plugin_hwaddr *hw = qemu_plugin_get_hwaddr(info, vaddr);
    VcpuState *v = &vcpus[idx];
    if (!hw) {
        return;
    }
    if (qemu_plugin_hwaddr_is_io(hw)) {
        v->mmio++;
        return;
    }
    touch(v, qemu_plugin_hwaddr_phys_addr(hw) >> 12, qemu_plugin_mem_is_store(info) ? F_WRITE : F_READ);
}

static void vcpu_resume(qemu_plugin_id_t id, unsigned int idx);

static void vcpu_tb_exec(unsigned int idx, void *udata)
{
    TbInfo *tb = udata;
    VcpuState *v = &vcpus[idx];
    if (v->idle_since) {
        vcpu_resume(0, idx);  /* the first instructions of a vCPU that never halted (the BSP) */
    }
    if (!v->tid_known) {
        v->tid_known = true;
        g_mutex_lock(&out_lock);
        write_u32s(2, idx, (uint32_t)syscall(SYS_gettid), 0);
        g_mutex_unlock(&out_lock);
    }
    if ((++v->tbs & 31) == 0) {
        roll_to(v, idx, now_ns());
    }
    v->insns += tb->insns;
    if (tb->page0) {
        touch(v, tb->page0, F_EXEC);
    }
    if (tb->page1 && tb->page1 != tb->page0) {
        touch(v, tb->page1, F_EXEC);
    }
}

static void vcpu_tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb);
    TbInfo *info = g_new0(TbInfo, 1);
    info->insns = n;
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        void *h = qemu_plugin_insn_haddr(insn);
        if (h) {
            uint64_t page = NS_HVA | ((uint64_t)(uintptr_t)h >> 12);
            if (!info->page0) {
                info->page0 = page;
            }
            info->page1 = page;
        }
        qemu_plugin_register_vcpu_mem_cb(insn, vcpu_mem, QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_MEM_RW, NULL);
    }
    qemu_plugin_register_vcpu_tb_exec_cb(tb, vcpu_tb_exec, QEMU_PLUGIN_CB_NO_REGS, info);
}

static void add_idle(VcpuState *v, uint64_t from, uint64_t to)
{
    /* the part of [from, to) inside the vCPU's current interval */
    uint64_t end = t0_ns + (v->interval + 1) * interval_ns;
    uint64_t stop = to < end ? to : end;
    if (stop > from) {
        v->idle_ns += stop - from;
    }
}

static void vcpu_idle(qemu_plugin_id_t id, unsigned int idx)
{
    VcpuState *v = &vcpus[idx];
    uint64_t t = now_ns();
    roll_to(v, idx, t);
    v->idle_since = t;
}

static void vcpu_resume(qemu_plugin_id_t id, unsigned int idx)
{
    VcpuState *v = &vcpus[idx];
    uint64_t t = now_ns();
    if (v->idle_since) {
        add_idle(v, v->idle_since, t);
        roll_to(v, idx, t);
        uint64_t start = t0_ns + v->interval * interval_ns;
        if (v->idle_since < start) {
            v->idle_ns += t - start;  /* idle from this interval's start until now */
        }
        v->idle_since = 0;
    } else {
        roll_to(v, idx, t);
    }
}

static void plugin_exit(qemu_plugin_id_t id, void *p)
{
    uint64_t t = now_ns();
    for (int i = 0; i < max_vcpus; i++) {
        VcpuState *v = &vcpus[i];
        if (v->idle_since) {
            add_idle(v, v->idle_since, t);
        }
        flush_row(v, i);
    }
    g_mutex_lock(&out_lock);
    write_u32s(3, 0, 0, 0);
    fwrite(&t, sizeof(t), 1, out);
    fclose(out);
    out = NULL;
    g_mutex_unlock(&out_lock);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    const char *path = NULL;
    if (!info->system_emulation) {
        fprintf(stderr, "desim_record: needs full-system emulation\n");
        return -1;
    }
    for (int i = 0; i < argc; i++) {
        if (g_str_has_prefix(argv[i], "out=")) {
            path = argv[i] + 4;
        } else if (g_str_has_prefix(argv[i], "interval_us=")) {
            interval_ns = g_ascii_strtoull(argv[i] + 12, NULL, 10) * 1000ull;
        } else {
            fprintf(stderr, "desim_record: unknown argument %s\n", argv[i]);
            return -1;
        }
    }
    if (!path || interval_ns == 0) {
        fprintf(stderr, "desim_record: needs out=FILE and interval_us > 0\n");
        return -1;
    }
    out = fopen(path, "wb");
    if (!out) {
        perror("desim_record: cannot open output");
        return -1;
    }
    max_vcpus = info->system.max_vcpus;
    vcpus = g_new0(VcpuState, max_vcpus);
    for (int i = 0; i < max_vcpus; i++) {
        vcpus[i].pages = g_hash_table_new(g_direct_hash, g_direct_equal);
        vcpus[i].idle_since = 0;
    }
    t0_ns = now_ns();
    fwrite("DSMREC01", 8, 1, out);
    uint64_t h[2] = {t0_ns, interval_ns};
    fwrite(h, sizeof(h), 1, out);
    write_u32s((uint32_t)max_vcpus, 0, 0, 0);
    /* vCPUs that have not started yet count as idle from the start */
    for (int i = 0; i < max_vcpus; i++) {
        vcpus[i].idle_since = t0_ns;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, vcpu_tb_trans);
    qemu_plugin_register_vcpu_idle_cb(id, vcpu_idle);
    qemu_plugin_register_vcpu_resume_cb(id, vcpu_resume);
    qemu_plugin_register_atexit_cb(id, plugin_exit, NULL);
    return 0;
}
