; Eiger 16M-like detector read with 2 x 2 binning from its native files, written for nbtorch's tests after
; the structure of CrystFEL's doc/examples/Eiger16M-binning2-nativefiles.geom: one panel, the gaps between
; the 4 x 8 modules (binned: 515 x 257 pixels, gaps of 5 and 18) marked as bad strips.

; Camera length (in m) and photon energy (eV)
clen = 0.1
photon_energy = 22000

adu_per_photon = 1
res = 6666.67   ; 150 micron binned pixels

; data layout of the native multi-frame files
dim0 = %
dim1 = ss
dim2 = fs
data = /entry/data/data

; strips between modules
bad_v0/min_fs = 515
bad_v0/min_ss = 0
bad_v0/max_fs = 519
bad_v0/max_ss = 2181

bad_v1/min_fs = 1035
bad_v1/min_ss = 0
bad_v1/max_fs = 1039
bad_v1/max_ss = 2181

bad_v2/min_fs = 1555
bad_v2/min_ss = 0
bad_v2/max_fs = 1559
bad_v2/max_ss = 2181

bad_h0/min_fs = 0
bad_h0/min_ss = 257
bad_h0/max_fs = 2074
bad_h0/max_ss = 274

bad_h1/min_fs = 0
bad_h1/min_ss = 532
bad_h1/max_fs = 2074
bad_h1/max_ss = 549

bad_h2/min_fs = 0
bad_h2/min_ss = 807
bad_h2/max_fs = 2074
bad_h2/max_ss = 824

bad_h3/min_fs = 0
bad_h3/min_ss = 1082
bad_h3/max_fs = 2074
bad_h3/max_ss = 1099

bad_h4/min_fs = 0
bad_h4/min_ss = 1357
bad_h4/max_fs = 2074
bad_h4/max_ss = 1374

bad_h5/min_fs = 0
bad_h5/min_ss = 1632
bad_h5/max_fs = 2074
bad_h5/max_ss = 1649

bad_h6/min_fs = 0
bad_h6/min_ss = 1907
bad_h6/max_fs = 2074
bad_h6/max_ss = 1924

; a separate bad-pixel map, if there is one:
;mask_file = eiger-badmap.h5
;mask = /data/data
;mask_good = 0x0
;mask_bad = 0x1

; corner_{x,y}: the detector's corner relative to the beam (pixels)
panel0/min_fs = 0
panel0/min_ss = 0
panel0/max_fs = 2074
panel0/max_ss = 2181
panel0/corner_x = -1040.0
panel0/corner_y = -1093.5
panel0/fs = x
panel0/ss = y
