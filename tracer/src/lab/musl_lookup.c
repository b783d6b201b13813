/* A DNS client with musl's resolver, for `tracer lab dns-race --client musl`: one
 * getaddrinfo() of the name given, all families. musl sends the A and AAAA queries back to
 * back from one socket and ignores glibc's resolv.conf options (single-request, ...).
 * Prints one address per line; exit status 0 only when at least one address came back. */
#include <arpa/inet.h>
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s NAME\n", argv[0]);
        return 2;
    }
    struct addrinfo hints, *res, *ai;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_DGRAM;
    int rc = getaddrinfo(argv[1], NULL, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "%s: %s\n", argv[1], gai_strerror(rc));
        return 1;
    }
    char buf[INET6_ADDRSTRLEN];
    for (ai = res; ai; ai = ai->ai_next) {
        const void *addr = ai->ai_family == AF_INET
            ? (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr
            : (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr;
        if (inet_ntop(ai->ai_family, addr, buf, sizeof buf))
            puts(buf);
    }
    freeaddrinfo(res);
    return 0;
}
