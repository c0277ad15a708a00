/* Native backtrace on a crash, for processes that load llama.cpp.
 *
 * Loaded with LD_PRELOAD (scripts/native-backtrace.sh builds and uses it). On SIGSEGV, SIGBUS, SIGILL,
 * SIGFPE or SIGABRT it writes the native call stack (glibc's backtrace) to the standard error the
 * process started with, then lets the signal take its course. That stream is kept open from the
 * start, because llama-cpp-python points file descriptor 2 at /dev/null while it loads a model.
 * Python's faulthandler, where enabled, prints the Python stack first and then hands the signal on.
 */
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int report_fd = -1;
static char alt_stack[1 << 16];

static void on_fatal(int sig, siginfo_t *info, void *context) {
    (void)context;
    void *frames[128];
    char line[160];
    int n = backtrace(frames, 128);
    int len = snprintf(line, sizeof line, "native backtrace: signal %d (%s) at address %p, %d frames\n", sig,
                       strsignal(sig), info ? info->si_addr : NULL, n);
    if (len > 0 && write(report_fd, line, (size_t)len) < 0) {
        /* nothing more can be done */
    }
    backtrace_symbols_fd(frames, n, report_fd);
    signal(sig, SIG_DFL);
    raise(sig);
}

__attribute__((constructor)) static void install(void) {
    report_fd = dup(STDERR_FILENO);
    if (report_fd < 0) {
        return;
    }
    void *warm[1];
    backtrace(warm, 1); /* loads libgcc's unwinder now, not inside the handler */
    stack_t ss = {.ss_sp = alt_stack, .ss_size = sizeof alt_stack, .ss_flags = 0};
    sigaltstack(&ss, NULL);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fatal;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    const int signals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
    for (size_t i = 0; i < sizeof signals / sizeof signals[0]; i++) {
        sigaction(signals[i], &sa, NULL);
    }
}
