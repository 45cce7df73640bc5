<?xml version="1.0" encoding="utf-8"?>
<!--
  rpp ObsCore archive: resource descriptor for GAVO DaCHS 2.7 (Debian bookworm).

  DaCHS creates the table rpp.main from this RD ("dachs imp q") and adds it to
  the ivoa.obscore view (//obscore#publishObscoreLike).  The reduction
  pipeline (rpp_tasks.outputs.archive.upsert_obscore) only INSERTs/UPDATEs rows, as
  the database role rpp_pipeline (SELECT, INSERT, UPDATE on rpp.main only;
  granted by archive/dachs/setup_dachs.sh); it never writes ivoa.*.
  New rows are visible at once in TAP, the sitewide SIAP2 service and the
  service "siap2" below: no re-import and no server restart.

  Do NOT "dachs drop rpp/q": it drops the schema with all pipeline rows.
  data updating="True" keeps the rows on re-imports ("dachs imp q",
  "dachs imp -m q").
-->
<resource schema="rpp" resdir=".">
  <meta name="creationDate">2025-06-01T00:00:00Z</meta>
  <meta name="title">RPP archive of reduced remote-telescope frames</meta>
  <meta name="description">
    Calibrated images (and 1-D spectra) reduced unattended every night by the
    RPP pipeline for pro-am remote-telescope networks.  One row per product,
    with the ObsCore 1.1 columns computed from the FITS headers and the WCS:
    footprints (SIP-aware) in s_region, times in MJD, wavelengths in metres,
    the measured seeing FWHM in s_resolution.
  </meta>
  <meta name="creator.name">RPP pipeline</meta>
  <meta name="subject">observational-astronomy</meta>
  <meta name="subject">astronomical-techniques</meta>
  <meta name="content.type">Archive</meta>

  <table id="main" onDisk="True" adql="True"
      primary="obs_publisher_did"
      mixin="//obscore#publishObscoreLike">
    <meta name="description">ObsCore-shaped table written by the RPP
      pipeline (one row per product, keyed by obs_publisher_did).  The
      columns rpp_session and rpp_band are queryable here but not part of
      ivoa.obscore.</meta>
    <FEED source="//obscore#obscore-columns"/>
    <column name="rpp_session" type="text" ucd="meta.id;obs"
      tablehead="Session"
      description="RPP reduction session (one night of one observatory)."
      verbLevel="15"/>
    <column name="rpp_band" type="text" ucd="instr.bandpass"
      tablehead="Band"
      description="Photometric band (canonical RPP name, e.g. V, g, Gaia G,
        L; the raw FILTER value when unknown)."
      verbLevel="15"/>

    <index columns="s_region" method="GIST"/>
    <index columns="s_ra,s_dec" name="q3c_pos" kind="q3c"
      >q3c_ang2ipix(s_ra, s_dec)</index>
    <index columns="t_min"/>
    <index columns="rpp_session"/>
    <!-- ivoa.obscore casts em_min/em_max to REAL: index the cast
         expressions so queries through the view can use them -->
    <index columns="em_min" name="em_min_real">CAST(em_min AS real)</index>
    <index columns="em_max" name="em_max_real">CAST(em_max AS real)</index>
  </table>

  <coverage>
    <updater sourceTable="main" mocOrder="6"/>
  </coverage>

  <!-- updating="True": "dachs imp" creates the table if missing and never
       drops the rows the pipeline inserted. -->
  <data id="create" updating="True">
    <make table="main"/>
  </data>

  <!-- Collection SIAP2 endpoint: /rpp/q/siap2/siap2.xml.  Like DaCHS'
       sitewide //siap2#sitewide it returns images and cubes only. -->
  <service id="siap2" allowed="siap2.xml,form">
    <meta name="shortName">rpp siap2</meta>
    <meta name="sia.type">Pointed</meta>
    <meta name="testQuery.pos.ra">65.16</meta>
    <meta name="testQuery.pos.dec">-54.94</meta>
    <meta name="testQuery.size.ra">0.1</meta>
    <meta name="testQuery.size.dec">0.1</meta>
    <dbCore queriedTable="main">
      <FEED source="//siap2#parameters"/>
      <condDesc combining="True">
        <phraseMaker>
          <code>
            yield "dataproduct_type in ('image', 'cube')"
          </code>
        </phraseMaker>
      </condDesc>
    </dbCore>
  </service>
</resource>
