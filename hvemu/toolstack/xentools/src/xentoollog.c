/* xentoollog.c -- hvemu's drop-in libxentoollog.so.1: a stdio logger with Xen's entry points. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "hvemu_glue.h"
#include "xentoollog.h"

struct xentoollog_logger_stdiostream {
    xentoollog_logger vtable;
    FILE *f;
    xentoollog_level min_level;
};

static const char *const level_names[XTL_NUM_LEVELS] = {"none", "debug", "verbose", "detail", "progress",
                                                        "info", "notice", "warning", "error", "critical"};

HVEMU_EXPORT const char *xtl_level_to_string(xentoollog_level level)
{
    return level >= 0 && level < XTL_NUM_LEVELS ? level_names[level] : "unknown";
}

static void stdio_vmessage(xentoollog_logger *logger, xentoollog_level level, int errnoval, const char *context,
                           const char *format, va_list al)
{
    struct xentoollog_logger_stdiostream *s = (struct xentoollog_logger_stdiostream *)logger;
    if (level < s->min_level)
        return;
    if (context)
        fprintf(s->f, "%s: ", context);
    fprintf(s->f, "%s: ", xtl_level_to_string(level));
    vfprintf(s->f, format, al);
    if (errnoval >= 0)
        fprintf(s->f, ": %s", strerror(errnoval));
    fputc('\n', s->f);
    fflush(s->f);
}

static void stdio_destroy(xentoollog_logger *logger)
{
    free(logger);
}

HVEMU_EXPORT xentoollog_logger_stdiostream *xtl_createlogger_stdiostream(FILE *f, xentoollog_level min_level,
                                                                         unsigned flags)
{
    (void)flags;
    struct xentoollog_logger_stdiostream *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->vtable.vmessage = stdio_vmessage;
    s->vtable.destroy = stdio_destroy;
    s->f = f;
    s->min_level = min_level;
    return s;
}

HVEMU_EXPORT void xtl_logv(struct xentoollog_logger *logger, xentoollog_level level, int errnoval,
                           const char *context, const char *format, va_list al)
{
    int saved = errno;
    if (logger && logger->vmessage)
        logger->vmessage(logger, level, errnoval, context, format, al);
    errno = saved;
}

HVEMU_EXPORT void xtl_log(struct xentoollog_logger *logger, xentoollog_level level, int errnoval,
                          const char *context, const char *format, ...)
{
    va_list al;
    va_start(al, format);
    xtl_logv(logger, level, errnoval, context, format, al);
    va_end(al);
}

HVEMU_EXPORT void xtl_logger_destroy(struct xentoollog_logger *logger)
{
    if (logger && logger->destroy)
        logger->destroy(logger);
}
