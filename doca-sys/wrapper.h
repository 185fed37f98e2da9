/* The DOCA headers DNE binds. Read from the installed SDK at build time;
 * nothing generated from them is ever committed (NVIDIA EULA). */
#define DOCA_ALLOW_EXPERIMENTAL_API
#include <doca_error.h>
#include <doca_types.h>
#include <doca_dev.h>
#include <doca_mmap.h>
#include <doca_buf.h>
#include <doca_buf_inventory.h>
#include <doca_pe.h>
#include <doca_ctx.h>
#include <doca_comch.h>
#include <doca_comch_producer.h>
#include <doca_comch_consumer.h>
#include <doca_rdma.h>
#include <doca_dma.h>
