/*
 * stowage-pause: the container of a mount holder (a pod that only keeps a PVC mounted so that the
 * node's agent can read it) and the pod sandbox image of the test cluster's real node.
 *
 * It waits for SIGTERM or SIGINT and exits 0. As a pod's first process (PID 1 of a shared PID
 * namespace) it also reaps orphaned children, so nothing it inherits stays a zombie.
 * Built static (gcc -static) so that the image holds this one file and nothing else.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
  (void)sig;
  _exit(0);
}

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "--version") == 0) {
    puts("stowage-pause");
    return 0;
  }
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = stop;
  if (sigaction(SIGINT, &sa, NULL) < 0 || sigaction(SIGTERM, &sa, NULL) < 0) {
    perror("stowage-pause: sigaction");
    return 1;
  }
  sa.sa_handler = reap;
  sa.sa_flags = SA_NOCLDSTOP;
  if (sigaction(SIGCHLD, &sa, NULL) < 0) {
    perror("stowage-pause: sigaction");
    return 1;
  }
  for (;;) {
    pause();
  }
}
