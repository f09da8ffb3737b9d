/* The pause process of the container tests' pod sandboxes (containerd's CRI runs one per
 * pod): it holds the pod's namespaces and does nothing until it is told to stop. */
#include <signal.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

int main(void) {
    signal(SIGTERM, stop);
    signal(SIGINT, stop);
    for (;;) pause();
}
