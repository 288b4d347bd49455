"""SCSI operation codes, sense keys and additional sense codes used by the
emulation. Names follow SPC-4/SBC-3 (and the Linux <scsi/scsi_proto.h>
spelling) so the code reads like the standards tables it implements.
"""
from __future__ import annotations

# -- operation codes --------------------------------------------------------
TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
READ_6 = 0x08
WRITE_6 = 0x0A
INQUIRY = 0x12
MODE_SELECT_6 = 0x15
RESERVE_6 = 0x16
RELEASE_6 = 0x17
MODE_SENSE_6 = 0x1A
START_STOP_UNIT = 0x1B
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
WRITE_10 = 0x2A
WRITE_AND_VERIFY_10 = 0x2E
VERIFY_10 = 0x2F
SYNCHRONIZE_CACHE_10 = 0x35
PRE_FETCH_10 = 0x34
WRITE_SAME_10 = 0x41
UNMAP = 0x42
MODE_SELECT_10 = 0x55
RESERVE_10 = 0x56
RELEASE_10 = 0x57
MODE_SENSE_10 = 0x5A
PERSISTENT_RESERVE_IN = 0x5E
PERSISTENT_RESERVE_OUT = 0x5F
READ_16 = 0x88
COMPARE_AND_WRITE = 0x89
WRITE_16 = 0x8A
WRITE_AND_VERIFY_16 = 0x8E
VERIFY_16 = 0x8F
SYNCHRONIZE_CACHE_16 = 0x91
WRITE_SAME_16 = 0x93
SERVICE_ACTION_IN_16 = 0x9E
REPORT_LUNS = 0xA0
MAINTENANCE_IN = 0xA3
READ_12 = 0xA8
WRITE_12 = 0xAA
WRITE_AND_VERIFY_12 = 0xAE
VERIFY_12 = 0xAF
PRE_FETCH_16 = 0x90

# service actions
SAI_READ_CAPACITY_16 = 0x10
SAI_GET_LBA_STATUS = 0x12
MI_REPORT_SUPPORTED_OPERATION_CODES = 0x0C

# -- sense keys -------------------------------------------------------------
NO_SENSE = 0x0
RECOVERED_ERROR = 0x1
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
ABORTED_COMMAND = 0xB
MISCOMPARE = 0xE

# -- additional sense code / qualifier pairs --------------------------------
ASC_NO_ADDITIONAL_SENSE = (0x00, 0x00)
# The LU cannot serve I/O until an operator acts (e.g. the clone while a
# protected restore runs). 04/03 "MANUAL INTERVENTION REQUIRED" was picked
# deliberately: Linux sd fails it at once instead of retrying for minutes as
# it does for 04/01 "becoming ready", and it does not pretend ALUA support as
# 04/0B-0C (standby/unavailable target port) would with TPGS=0.
ASC_NOT_READY_MANUAL_INTERVENTION = (0x04, 0x03)
ASC_WRITE_ERROR = (0x0C, 0x00)
ASC_INVALID_FIELD_IN_COMMAND_IU = (0x0E, 0x03)
ASC_UNRECOVERED_READ_ERROR = (0x11, 0x00)
ASC_PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
ASC_INVALID_OPCODE = (0x20, 0x00)
ASC_LBA_OUT_OF_RANGE = (0x21, 0x00)
ASC_INVALID_FIELD_IN_CDB = (0x24, 0x00)
ASC_LU_NOT_SUPPORTED = (0x25, 0x00)
ASC_INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
ASC_INVALID_RELEASE_OF_PR = (0x26, 0x04)
ASC_WRITE_PROTECTED = (0x27, 0x00)
# Unit attention: "the data under you may have changed". A restore replaces
# the LU's contents behind the host's back; 28/00 NOT READY TO READY CHANGE,
# MEDIUM MAY HAVE CHANGED is the one SPC code whose meaning is exactly that
# (a medium swap), whereas 2A/00 PARAMETERS CHANGED and 29/xx resets say
# nothing about the data. Used when LunIO.generation moves.
ASC_MEDIUM_MAY_HAVE_CHANGED = (0x28, 0x00)
ASC_POWER_ON_RESET = (0x29, 0x00)
ASC_BUS_DEVICE_RESET = (0x29, 0x03)       # after a LOGICAL UNIT RESET (SAM-5)
ASC_I_T_NEXUS_LOSS = (0x29, 0x07)
ASC_MODE_PARAMETERS_CHANGED = (0x2A, 0x01)
ASC_RESERVATIONS_PREEMPTED = (0x2A, 0x03)
ASC_RESERVATIONS_RELEASED = (0x2A, 0x04)
ASC_REGISTRATIONS_PREEMPTED = (0x2A, 0x05)
ASC_CAPACITY_DATA_HAS_CHANGED = (0x2A, 0x09)
ASC_SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)
ASC_REPORTED_LUNS_DATA_HAS_CHANGED = (0x3F, 0x0E)
ASC_INTERNAL_TARGET_FAILURE = (0x44, 0x00)
ASC_MISCOMPARE_DURING_VERIFY = (0x1D, 0x00)
