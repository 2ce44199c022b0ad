#include "rt.h"

#define COM1 0x3F8

void puts(const char *s) { while (*s) outb(COM1, (u8)*s++); }

void put_hex(u64 v) {
    char buf[19] = "0x";
    for (int i = 0; i < 16; i++) buf[2 + i] = "0123456789abcdef"[(v >> (60 - 4 * i)) & 15];
    buf[18] = 0;
    puts(buf);
}

void *memset(void *d, int c, u64 n) { u8 *p = d; while (n--) *p++ = (u8)c; return d; }
void *memcpy(void *d, const void *s, u64 n) { u8 *p = d; const u8 *q = s; while (n--) *p++ = *q++; return d; }
int memcmp(const void *a, const void *b, u64 n) {
    const u8 *p = a, *q = b;
    for (; n; n--, p++, q++) if (*p != *q) return *p < *q ? -1 : 1;
    return 0;
}

void *heap_alloc(struct mailbox *mb, u64 size, u64 align) {
    u64 a = (mb->heap + align - 1) & ~(align - 1);
    if (a + size > mb->heap + mb->heap_size) return 0;
    mb->heap_size -= a + size - mb->heap;
    mb->heap = a + size;
    return memset((void *)a, 0, size);
}

void set_message(struct mailbox *mb, const char *s) {
    u64 i = 0;
    for (; s[i] && i < sizeof(mb->message) - 1; i++) mb->message[i] = s[i];
    mb->message[i] = 0;
}
