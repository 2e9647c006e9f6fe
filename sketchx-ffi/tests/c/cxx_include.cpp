// The header from C++: extern "C" guards, include guard (included twice), and a call through the C ABI.
#include "sketchx.h"
#include "sketchx.h"

#include <cstdio>
#include <cstring>

int main() {
    sketchx_request request;
    if (sketchx_request_init(&request) != SKETCHX_OK || request.steps == 0) return 1;
    sketchx_result r = sketchx_request_init(nullptr);
    if (r != SKETCHX_NULL_ARGUMENT || std::strlen(sketchx_last_error_message()) == 0) return 1;
    if (std::strcmp(sketchx_version(), SKETCHX_VERSION_STRING) != 0) return 1;
    std::printf("C++: sketchx %s, %s\n", sketchx_version(), sketchx_result_name(r));
    return 0;
}
