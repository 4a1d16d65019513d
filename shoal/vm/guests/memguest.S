# shoal memory test guest: a multiboot v1 ELF32 kernel that dirties memory at a set rate.
#
# Booted as `qemu-system-x86_64 -kernel memguest.elf -append "rate=N"`. It zeroes
# [start, end), then increments byte 0 of every 4 KiB page in it, in page order, again
# and again, so a snapshot of the range holds one value in a prefix of the pages and
# that value minus one (mod 256) in the rest: the step is where the guest was. The host
# finds the range in a header at physical 0x5000. Serial lines, the header layout and the command line
# are documented in docs/GUESTS.md; shoal/vm/guests/check.py holds the same constants.
#
# Assembled with plain GNU as (no preprocessor): `as --32`, then
# `ld -m elf_i386 -N -Ttext=0x100000 -e _start`.

        .equ MB_MAGIC,      0x1BADB002
        .equ MB_FLAGS,      0x00000002      # bit 1: we want mem_lower/mem_upper
        .equ MB_BOOTED,     0x2BADB002      # what the loader leaves in %eax
        .equ COM1,          0x3f8
        .equ HDR,           0x5000          # the header the host reads (docs/GUESTS.md)
        .equ HDR_VERSION,   1
        .equ PAGE,          4096
        .equ RANGE_MIN,     0x200000        # below: this kernel, its stack, multiboot info
        .equ RATE_MAX,      1048575         # MiB/s; keeps rate*256 pages/s within 28 bits
        .equ HZ,            100             # timer interrupts per second
        .equ PIT_RELOAD,    11932           # 1193182 Hz / 11932 = 100 Hz
        .equ BATCH,         1024            # pages dirtied between two looks at the clock
        .equ IRQ_BASE,      0x20            # PIC vectors 0x20-0x2f, clear of CPU exceptions

        .section .text
        .code32
        .globl _start
        .p2align 2
multiboot_header:
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

_start:
        cli
        cld
        movl $stack_top, %esp
        cmpl $MB_BOOTED, %eax
        jne not_multiboot
        movl $__bss_start, %edi         # loaders need not zero .bss
        movl $_end, %ecx
        subl %edi, %ecx
        xorl %eax, %eax
        rep stosb
        movl %ebx, mbi
        # Our own GDT: the loader's may live anywhere and we reload segments below.
        lgdt gdt_desc
        ljmp $0x08, $flat
flat:
        movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %fs
        movw %ax, %gs
        movw %ax, %ss

        movl $0, HDR                    # no valid header until the range is clean
        call read_boot_info
        call clear_range
        call write_header
        call print_start
        call setup_interrupts
        jmp dirty_forever

not_multiboot:
        movl $msg_not_multiboot, %esi
        call puts
        jmp stop

bad_range:
        movl $msg_bad_range, %esi
        call puts
stop:
        cli
        hlt
        jmp stop

# Top of RAM from the multiboot info, then the command line's overrides.
read_boot_info:
        movl mbi, %ebx
        testl $1, (%ebx)                # mem_lower/mem_upper valid?
        jz 1f
        movl 8(%ebx), %eax              # KiB of RAM above 1 MiB, up to the first hole
        addl $1024, %eax
        cmpl $0x3FFFFC, %eax            # keep end + PAGE within 32 bits
        jbe 2f
        movl $0x3FFFFC, %eax
2:      shll $10, %eax
        movl %eax, ram_top
        movl %eax, range_end
1:      testl $4, (%ebx)                # cmdline valid?
        jz 3f
        movl 16(%ebx), %esi
        call parse_cmdline
3:      # start rounds up to a page and never below RANGE_MIN; end rounds down and
        # never beyond RAM.
        movl range_start, %eax
        addl $PAGE-1, %eax
        andl $~(PAGE-1), %eax
        cmpl $RANGE_MIN, %eax
        jae 4f
        movl $RANGE_MIN, %eax
4:      movl %eax, range_start
        movl range_end, %eax
        movl ram_top, %edx
        testl %edx, %edx
        jz 5f
        cmpl %edx, %eax
        jbe 5f
        movl %edx, %eax
5:      andl $~(PAGE-1), %eax
        movl %eax, range_end
        cmpl range_start, %eax
        jbe bad_range
        cmpl $RATE_MAX, rate
        jbe 6f
        movl $RATE_MAX, rate
6:      ret

# Tokens `rate=N`, `start=N`, `end=N` anywhere in the command line (QEMU prepends the
# kernel's path). N is decimal or 0x-hex with an optional K, M or G suffix.
parse_cmdline:                          # %esi: NUL-terminated string
1:      movb (%esi), %al
        testb %al, %al
        jz 9f
        cmpb $' ', %al
        jne 2f
        incl %esi
        jmp 1b
2:      movl $key_rate, %edi
        call match_key
        jc 3f
        call parse_num
        movl %eax, rate
        jmp 8f
3:      movl $key_start, %edi
        call match_key
        jc 4f
        call parse_num
        movl %eax, range_start
        jmp 8f
4:      movl $key_end, %edi
        call match_key
        jc 8f
        call parse_num
        movl %eax, range_end
8:      movb (%esi), %al                # skip the rest of the token
        testb %al, %al
        jz 9f
        cmpb $' ', %al
        je 1b
        incl %esi
        jmp 8b
9:      ret

# Carry clear and %esi past the key when the string at %esi starts with the
# NUL-terminated key at %edi; carry set and %esi unchanged otherwise.
match_key:
        pushl %esi
1:      movb (%edi), %dl
        testb %dl, %dl
        jz 2f
        cmpb (%esi), %dl
        jne 3f
        incl %esi
        incl %edi
        jmp 1b
2:      addl $4, %esp
        clc
        ret
3:      popl %esi
        stc
        ret

parse_num:                              # %esi: digits -> %eax, %esi past them
        xorl %eax, %eax
        movl $10, %ecx
        cmpb $'0', (%esi)
        jne 1f
        movb 1(%esi), %dl
        orb $0x20, %dl
        cmpb $'x', %dl
        jne 1f
        addl $2, %esi
        movl $16, %ecx
1:      movzbl (%esi), %edx
        subl $'0', %edx
        cmpl $9, %edx
        jbe 2f
        cmpl $16, %ecx
        jne 3f
        movzbl (%esi), %edx
        orl $0x20, %edx
        subl $'a', %edx
        cmpl $5, %edx
        ja 3f
        addl $10, %edx
2:      imull %ecx, %eax
        addl %edx, %eax
        incl %esi
        jmp 1b
3:      movzbl (%esi), %edx
        orl $0x20, %edx
        cmpl $'k', %edx
        jne 4f
        shll $10, %eax
        incl %esi
        ret
4:      cmpl $'m', %edx
        jne 5f
        shll $20, %eax
        incl %esi
        ret
5:      cmpl $'g', %edx
        jne 6f
        shll $30, %eax
        incl %esi
6:      ret

# Firmware leaves data in RAM (and a reset keeps it): zero the whole range so every
# byte is known, 0, from the start line on.
clear_range:
        movl range_start, %edi
        movl range_end, %ecx
        subl %edi, %ecx
        shrl $2, %ecx
        xorl %eax, %eax
        rep stosl
        ret

write_header:
        movl $hdr_magic, %esi
        movl $HDR, %edi
        movl $2, %ecx
        rep movsl
        movl $HDR_VERSION, HDR+8
        movl $PAGE, HDR+12
        movl range_start, %eax
        movl %eax, HDR+16
        movl range_end, %eax
        movl %eax, HDR+20
        movl rate, %eax
        movl %eax, HDR+24
        movl $0, HDR+28                 # full passes so far
        ret

print_start:
        movl $msg_start, %esi
        call puts
        movl rate, %eax
        call putdec
        movl $msg_range, %esi
        call puts
        movl range_start, %eax
        call puthex
        movl $msg_dash, %esi
        call puts
        movl range_end, %eax
        call puthex
        movb $'\n', %al
        call putc
        ret

print_pass:                             # keeps every register: the work loop lives in them
        pushl %eax
        pushl %esi
        movl $msg_pass, %esi
        call puts
        movl HDR+28, %eax
        call putdec
        movb $'\n', %al
        call putc
        popl %esi
        popl %eax
        ret

# The PIT ticks at HZ through the 8259 PIC; the handler counts ticks. Every other
# vector below 0x30 is either a CPU exception (fatal: say so and stop) or another
# IRQ (acknowledge and ignore).
setup_interrupts:
        xorl %ecx, %ecx
1:      movl $fault, %eax
        cmpl $IRQ_BASE, %ecx
        jb 2f
        movl $other_irq, %eax
        cmpl $IRQ_BASE, %ecx
        jne 2f
        movl $timer_irq, %eax
2:      movw %ax, idt(,%ecx,8)
        movw $0x08, idt+2(,%ecx,8)
        shrl $16, %eax
        movw $0x8E00, idt+4(,%ecx,8)    # present, ring 0, 32-bit interrupt gate
        movw %ax, idt+6(,%ecx,8)
        incl %ecx
        cmpl $0x30, %ecx
        jb 1b
        lidt idt_desc

        movb $0x11, %al                 # ICW1: initialise, ICW4 follows
        outb %al, $0x20
        outb %al, $0xA0
        movb $IRQ_BASE, %al             # ICW2: vector bases
        outb %al, $0x21
        movb $IRQ_BASE+8, %al
        outb %al, $0xA1
        movb $0x04, %al                 # ICW3: slave on IRQ2
        outb %al, $0x21
        movb $0x02, %al
        outb %al, $0xA1
        movb $0x01, %al                 # ICW4: 8086 mode
        outb %al, $0x21
        outb %al, $0xA1
        movb $0xFE, %al                 # only IRQ0 (the PIT)
        outb %al, $0x21
        movb $0xFF, %al
        outb %al, $0xA1

        movb $0x34, %al                 # PIT channel 0, lobyte/hibyte, mode 2
        outb %al, $0x43
        movw $PIT_RELOAD, %ax
        outb %al, $0x40
        movb %ah, %al
        outb %al, $0x40
        sti
        ret

timer_irq:
        pushl %eax
        incl ticks
        movb $0x20, %al
        outb %al, $0x20
        popl %eax
        iret

other_irq:
        pushl %eax
        movb $0x20, %al
        outb %al, $0xA0
        outb %al, $0x20
        popl %eax
        iret

fault:
        cli
        movl $msg_fault, %esi
        call puts
        jmp stop

# The work loop. Registers: %esi the next page, %edi the range end, %ebp pages owed
# under a rate limit. With rate=0 it dirties BATCH pages between looks at the clock;
# otherwise each tick earns rate*256/HZ pages (the remainder carried) and the CPU
# halts until the next tick once the debt is paid.
dirty_forever:
        movl range_start, %esi
        movl range_end, %edi
        xorl %ebp, %ebp
        movl rate, %eax
        shll $8, %eax                   # 256 pages per MiB
        movl %eax, pps
        shrl $2, %eax                   # owe at most a quarter second of work
        addl $BATCH, %eax
        movl %eax, owed_max
        movl ticks, %eax
        movl %eax, last_ticks
main_loop:
        movl ticks, %eax
        movl %eax, %ebx
        subl last_ticks, %ebx           # ticks since we last looked
        movl %eax, last_ticks
        addl %ebx, heartbeat
        cmpl $HZ, heartbeat
        jb 1f
        movl $0, heartbeat
        call print_pass
1:      cmpl $0, pps
        jne 2f
        movl $BATCH, %ecx
        jmp dirty
2:      testl %ebx, %ebx
        jz 4f
        movl %ebx, %eax
        mull pps                        # %edx:%eax = ticks * pages per second
        addl credit, %eax
        adcl $0, %edx
        movl $HZ, %ecx
        divl %ecx
        movl %edx, credit
        addl %eax, %ebp
        cmpl owed_max, %ebp
        jbe 4f
        movl owed_max, %ebp
4:      testl %ebp, %ebp
        jnz 5f
        hlt                             # nothing owed: sleep until the next tick
        jmp main_loop
5:      movl %ebp, %ecx
        cmpl $BATCH, %ecx
        jbe 6f
        movl $BATCH, %ecx
6:      subl %ecx, %ebp
dirty:
        incb (%esi)
        addl $PAGE, %esi
        cmpl %edi, %esi
        jb 7f
        movl range_start, %esi
        incl HDR+28                     # a full pass is done
7:      decl %ecx
        jnz dirty
        jmp main_loop

# Serial output on COM1; QEMU's UART needs no setup. putc waits (boundedly) for the
# transmitter to be free.
putc:                                   # %al: byte
        pushl %eax
        pushl %ecx
        pushl %edx
        movb %al, %ah
        movl $0x100000, %ecx
        movw $COM1+5, %dx
1:      inb %dx, %al
        testb $0x20, %al
        jnz 2f
        decl %ecx
        jnz 1b
2:      movb %ah, %al
        movw $COM1, %dx
        outb %al, %dx
        popl %edx
        popl %ecx
        popl %eax
        ret

puts:                                   # %esi: NUL-terminated string
        pushl %eax
        pushl %esi
1:      lodsb
        testb %al, %al
        jz 2f
        call putc
        jmp 1b
2:      popl %esi
        popl %eax
        ret

putdec:                                 # %eax: unsigned
        pushl %eax
        pushl %ecx
        pushl %edx
        pushl %esi
        movl $numbuf_end, %esi
        movb $0, (%esi)
        movl $10, %ecx
1:      xorl %edx, %edx
        divl %ecx
        addb $'0', %dl
        decl %esi
        movb %dl, (%esi)
        testl %eax, %eax
        jnz 1b
        call puts
        popl %esi
        popl %edx
        popl %ecx
        popl %eax
        ret

puthex:                                 # %eax: printed as 8 lowercase hex digits
        pushl %eax
        pushl %ecx
        pushl %edx
        movl %eax, %edx
        movl $8, %ecx
1:      roll $4, %edx
        movl %edx, %eax
        andl $0xf, %eax
        movb hexdigits(%eax), %al
        call putc
        decl %ecx
        jnz 1b
        popl %edx
        popl %ecx
        popl %eax
        ret

        .section .data
        .p2align 3
gdt:
        .quad 0
        .quad 0x00CF9A000000FFFF        # 0x08: code, base 0, 4 GiB, 32-bit
        .quad 0x00CF92000000FFFF        # 0x10: data, base 0, 4 GiB
gdt_end:
gdt_desc:
        .word gdt_end - gdt - 1
        .long gdt
idt_desc:
        .word 0x30 * 8 - 1
        .long idt
hdr_magic:
        .ascii "SHOALMEM"
hexdigits:
        .ascii "0123456789abcdef"
key_rate:
        .asciz "rate="
key_start:
        .asciz "start="
key_end:
        .asciz "end="
msg_start:
        .asciz "shoal-memguest start rate="
msg_range:
        .asciz " range=0x"
msg_dash:
        .asciz "-0x"
msg_pass:
        .asciz "shoal-memguest pass="
msg_not_multiboot:
        .asciz "shoal-memguest FATAL not started by a multiboot loader\n"
msg_bad_range:
        .asciz "shoal-memguest FATAL the range to dirty is empty\n"
msg_fault:
        .asciz "shoal-memguest FATAL cpu exception\n"
range_start:
        .long RANGE_MIN

        .section .bss
        .p2align 3
mbi:        .skip 4
ram_top:    .skip 4
range_end:  .skip 4
rate:       .skip 4
pps:        .skip 4
owed_max:   .skip 4
credit:     .skip 4
ticks:      .skip 4
last_ticks: .skip 4
heartbeat:  .skip 4
numbuf:     .skip 15
numbuf_end: .skip 1
        .p2align 3
idt:        .skip 0x30 * 8
        .p2align 4
stack:      .skip 16384
stack_top:
