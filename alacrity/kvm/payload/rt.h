/* The payload's tiny runtime: port I/O, MMIO, the serial console, time, the mailbox. */
#pragma once
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long s64;

#define MAILBOX_MAGIC 0x4B414C41u          /* "ALAK" */
#define MAX_DEVICES 8
enum { DEV_NONE = 0, DEV_VIRTIO_MMIO = 1, DEV_VBUS_BRIDGE = 2 };   /* vbus: device_id = PIO base */
enum { TEST_SELFTEST = 1, TEST_HOSTILE = 2, TEST_SPIN = 3, TEST_FAULT = 4, TEST_PATTERN = 5,
       TEST_BENCH_BLK = 6, TEST_BENCH_NET = 7, TEST_LIMIT_SHM = 8 };

/* shared with alacrity/kvm/vm.py (MAILBOX): keep the two in step */
struct mailbox {
    u32 magic, test;
    u32 ndevices, flags;                    /* bit 0 packed rings, bit 1 event_idx, bit 2 interrupts */
    struct { u32 kind, device_id; u64 base; } devices[MAX_DEVICES];
    u64 heap, heap_size;                    /* guest RAM the payload may use for rings, buffers */
    u64 tsc_khz;
    u64 args[8];                            /* selftest: seed, sectors to touch */
    u64 results[16];                        /* per device: ops done, errors */
    u32 status, cpl;                        /* status: 0 ok; cpl: the privilege level we ran at */
    char message[256];
    u8 gsi[MAX_DEVICES];                    /* each device's interrupt pin (CPL0 mode) */
};

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
static inline void barrier(void) { __asm__ volatile("mfence" ::: "memory"); }
static inline void compiler_barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline u32 current_cpl(void) { u16 cs; __asm__ volatile("mov %%cs, %0" : "=r"(cs)); return cs & 3; }

void puts(const char *s);
void put_hex(u64 v);
void *memset(void *d, int c, u64 n);
void *memcpy(void *d, const void *s, u64 n);
int memcmp(const void *a, const void *b, u64 n);
void *heap_alloc(struct mailbox *mb, u64 size, u64 align);
void set_message(struct mailbox *mb, const char *s);
