/* xentoollog.h -- the logger interface of Xen's libxentoollog.so.1, as hvemu's drop-in provides it. */
#ifndef HVEMU_XENTOOLLOG_H
#define HVEMU_XENTOOLLOG_H

#include <stdarg.h>
#include <stdio.h>

typedef enum xentoollog_level {
    XTL_NONE,
    XTL_DEBUG,
    XTL_VERBOSE,
    XTL_DETAIL,
    XTL_PROGRESS,
    XTL_INFO,
    XTL_NOTICE,
    XTL_WARN,
    XTL_ERROR,
    XTL_CRITICAL,
    XTL_NUM_LEVELS
} xentoollog_level;

/* The layout every logger starts with (Xen's struct xentoollog_logger). */
typedef struct xentoollog_logger {
    void (*vmessage)(struct xentoollog_logger *logger, xentoollog_level level, int errnoval, const char *context,
                     const char *format, va_list al) __attribute__((format(printf, 5, 0)));
    void (*progress)(struct xentoollog_logger *logger, const char *context, const char *doing_what, int percent,
                     unsigned long done, unsigned long total);
    void (*destroy)(struct xentoollog_logger *logger);
} xentoollog_logger;

typedef struct xentoollog_logger_stdiostream xentoollog_logger_stdiostream;

xentoollog_logger_stdiostream *xtl_createlogger_stdiostream(FILE *f, xentoollog_level min_level, unsigned flags);
void xtl_log(struct xentoollog_logger *logger, xentoollog_level level, int errnoval, const char *context,
             const char *format, ...) __attribute__((format(printf, 5, 6)));
void xtl_logv(struct xentoollog_logger *logger, xentoollog_level level, int errnoval, const char *context,
              const char *format, va_list al) __attribute__((format(printf, 5, 0)));
void xtl_logger_destroy(struct xentoollog_logger *logger);
const char *xtl_level_to_string(xentoollog_level level);

#endif
